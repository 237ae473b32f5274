"""timm NFNet weights both ways (nfnets.timm_weights, scripts.convert_checkpoint --from/--to timm).

The fixtures (tests/fixtures/timm_nfnet/README.md) were made with timm; PyTorch is not needed here.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from nfnets import checkpoint
from nfnets import models
from nfnets import timm_weights
from nfnets.errors import CheckpointError
from nfnets.models import layers
from scripts import convert_checkpoint
from scripts import reproduce_table
from tests.helpers import REPO_ROOT

FIXTURES = os.path.join(REPO_ROOT, 'tests', 'fixtures', 'timm_nfnet')
SMALL = os.path.join(FIXTURES, 'small_nfnet.safetensors')

# Measured on the fixture: our (the reference's) forward pass vs timm's logits, max |difference| 0.0130 of logits
# up to 2.1 in size; the same weights under timm's numerics (eps-1e-5 weight standardisation, erf GELU) 1.0e-6.
REFERENCE_VS_TIMM_ATOL = 0.02
SAME_NUMERICS_ATOL = 1e-5


@pytest.fixture(scope='module')
def small():
  return checkpoint.read(SMALL)


@pytest.fixture(scope='module')
def timm_state_dict():
  return safetensors.numpy.load_file(SMALL)


@pytest.fixture(scope='module')
def f0_shapes():
  with open(os.path.join(FIXTURES, 'dm_nfnet_f0_shapes.json')) as f:
    return {key: tuple(shape) for key, shape in json.load(f).items()}


def _logits(loaded):
  forward = models.make_forward(loaded.model_config)
  params, state = loaded.weight_sets['']
  images = np.load(os.path.join(FIXTURES, 'small_input_nhwc.npy'))
  logits, _ = jax.jit(lambda p, s, x: forward.apply(p, s, None, x, is_training=False))(params, state, images)
  return np.asarray(logits)


def _timm_logits():
  return np.load(os.path.join(FIXTURES, 'small_logits.npy'))


def test_the_architecture_and_class_count_are_read_off_the_shapes(small):
  config = small.model_config
  assert small.kind == 'timm' and small.step == 0 and small.config is None
  assert (config['variant'], config['depths'], config['widths'], config['group_width'], config['stem_width'],
          config['num_classes']) == ('F0', (1, 1, 1, 1), (64, 128, 256, 256), 32, 128, 10)


def test_the_imported_model_gives_timms_logits_up_to_the_standardisation(small):
  ours, theirs = _logits(small), _timm_logits()
  difference = np.abs(ours - theirs).max()
  assert difference <= REFERENCE_VS_TIMM_ATOL
  assert (ours.argmax(-1) == theirs.argmax(-1)).all()
  # Our model stays the reference's: its weight standardisation is not timm's, and that shows.
  assert difference > 1e-3


def test_under_timms_numerics_the_imported_model_is_timms(small, monkeypatch):
  """With timm's eps-1e-5 standardisation and erf GELU patched in, any mapping mistake (a transpose, a swapped
  conv, a lost gain) would show far above float32 rounding."""

  def timm_standardize(weight, gain, eps=None):
    del eps
    matrix = weight.reshape(-1, weight.shape[-1])
    standardised = (matrix - matrix.mean(0)) * jax.lax.rsqrt(matrix.var(0) + 1e-5)
    return (standardised * gain * matrix.shape[0]**-0.5).reshape(weight.shape)

  monkeypatch.setattr(layers, 'standardize_weight', timm_standardize)
  gamma = layers.activation_gamma('gelu')
  monkeypatch.setitem(layers._ACTIVATIONS, 'gelu', (lambda x: jax.nn.gelu(x, approximate=False), gamma))  # pylint: disable=protected-access
  np.testing.assert_allclose(_logits(small), _timm_logits(), rtol=0, atol=SAME_NUMERICS_ATOL)


def test_export_then_import_is_bitwise(small, timm_state_dict):
  params, _ = small.weight_sets['']
  exported = timm_weights.to_state_dict(params, small.model_config)
  assert set(exported) == set(timm_state_dict)
  for key, value in timm_state_dict.items():
    assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
    assert exported[key].tobytes() == value.tobytes(), key
  again, config = timm_weights.from_state_dict(exported)
  assert config == small.model_config
  for module, leaves in params.items():
    for name, value in leaves.items():
      assert again[module][name].shape == value.shape and again[module][name].tobytes() == value.tobytes()


def test_the_command_line_round_trip_through_a_project_checkpoint_is_bitwise(timm_state_dict, tmp_path):
  project = str(tmp_path / 'small')
  convert_checkpoint.convert(SMALL, project, file_format='timm')
  assert checkpoint.read(project).kind == 'project'
  out = str(tmp_path / 'small.safetensors')
  weights, line = convert_checkpoint.export_timm(project, out)
  assert weights == 'raw' and 'group_size=32' in line and 'num_classes=10' in line
  back = safetensors.numpy.load_file(out)
  assert set(back) == set(timm_state_dict)
  assert all(back[k].tobytes() == v.tobytes() and back[k].shape == v.shape for k, v in timm_state_dict.items())
  with pytest.raises(CheckpointError, match='already exists'):
    convert_checkpoint.export_timm(project, out)


def test_timms_f0_maps_one_to_one_onto_ours(f0_shapes):
  config = timm_weights.model_config_of(f0_shapes)
  assert config == models.model_config('nfnet', 'F0').to_dict()
  mapping = timm_weights.key_map(config)
  keys = [key for key, _ in mapping.values()]
  assert len(keys) == len(set(keys)) == len(f0_shapes) == 233  # every timm key used once
  ours, _ = models.abstract_params(config)
  assert len(mapping) == sum(len(leaves) for leaves in ours.values())
  assert timm_weights.timm_shapes(config) == f0_shapes
  assert timm_weights.timm_model_line(config) == "timm.create_model('dm_nfnet_f0', num_classes=1000)"


def test_a_deeper_variant_and_another_class_count_are_recognised():
  shapes = timm_weights.timm_shapes(models.model_config('nfnet', 'F1', num_classes=7))
  assert timm_weights.model_config_of(shapes) == models.model_config('nfnet', 'F1', num_classes=7).to_dict()


def _small_shapes():
  return {key: tuple(value.shape) for key, value in safetensors.numpy.load_file(SMALL).items()}


def _eca_nfnet_shapes():
  """eca_nfnet_l0's layout (small): the same stem and convs, ECA instead of SE, no skip gains."""
  shapes = {k: v for k, v in _small_shapes().items() if 'attn_last' not in k and 'skipinit' not in k}
  shapes.update({f'stages.{s}.0.attn_last.conv.weight': (1, 1, 5) for s in range(4)})
  return shapes


def _nf_resnet_shapes():
  shapes = {'stem.conv.weight': (64, 3, 7, 7), 'stem.conv.bias': (64,), 'stem.conv.gain': (64, 1, 1, 1),
            'head.fc.weight': (1000, 2048), 'head.fc.bias': (1000,)}
  for conv, shape in (('conv1', (64, 64, 1, 1)), ('conv2', (64, 64, 3, 3)), ('conv3', (256, 64, 1, 1)),
                      ('downsample.conv', (256, 64, 1, 1))):
    shapes.update({f'stages.0.0.{conv}.weight': shape, f'stages.0.0.{conv}.gain': (shape[0], 1, 1, 1),
                   f'stages.0.0.{conv}.bias': (shape[0],)})
  return shapes


def _resnet_shapes():
  return {'conv1.weight': (64, 3, 7, 7), 'bn1.weight': (64,), 'bn1.bias': (64,), 'bn1.running_mean': (64,),
          'layer1.0.conv1.weight': (64, 64, 1, 1), 'fc.weight': (1000, 2048), 'fc.bias': (1000,)}


def _without(shapes, *keys):
  return {k: v for k, v in shapes.items() if k not in keys}


@pytest.mark.parametrize('make_shapes, offending', [
    (_eca_nfnet_shapes, "unexpected key 'stages.0.0.attn_last.conv.weight'"),
    (_nf_resnet_shapes, "unexpected key 'stem.conv.bias'"),
    (_resnet_shapes, "unexpected key 'bn1.bias'"),
    (lambda: _without(_small_shapes(), 'stages.2.0.conv2b.gain'), "missing key 'stages.2.0.conv2b.gain'"),
    (lambda: {k: v for k, v in _small_shapes().items() if not k.startswith('stages.3.')},
     "missing key 'stages.3.0.conv3.weight'"),
    (lambda: dict(_small_shapes(), **{'stages.1.0.conv2.running_var': (64,)}),
     "unexpected key 'stages.1.0.conv2.running_var'"),
    (lambda: dict(_small_shapes(), **{'stages.1.0.conv2b.weight': (64, 64, 3, 3)}),
     'stages.1.0.conv2b.weight has shape (64, 64, 3, 3), expected (64, 32, 3, 3)'),
])
def test_other_models_and_damaged_state_dicts_are_refused_naming_the_first_offending_key(make_shapes, offending):
  with pytest.raises(CheckpointError) as error:
    timm_weights.model_config_of(make_shapes())
  assert offending in str(error.value) and '\n' not in str(error.value)


def test_an_extra_block_conv_in_the_full_size_layout_is_named(f0_shapes):
  shapes = dict(f0_shapes, **{'stages.1.1.downsample.conv.weight': (512, 512, 1, 1)})
  with pytest.raises(CheckpointError, match=r"unexpected key 'stages\.1\.1\.downsample\.conv\.weight'"):
    timm_weights.model_config_of(shapes)


def test_a_bad_file_is_one_line_naming_it_and_nothing_is_written(timm_state_dict, tmp_path):
  damaged = dict(timm_state_dict)
  damaged['stages.2.0.conv1.weight'] = np.zeros((128, 64, 1, 1), np.float32)
  bad = tmp_path / 'damaged.safetensors'
  safetensors.numpy.save_file(damaged, str(bad))
  with pytest.raises(CheckpointError, match=rf"^{bad}: stages\.2\.0\.conv1\.weight has shape \(128, 64, 1, 1\)"):
    convert_checkpoint.convert(str(bad), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
  not_safetensors = tmp_path / 'weights.safetensors'
  not_safetensors.write_bytes(b'\x80\x04not a safetensors file')
  result = subprocess.run([sys.executable, '-m', 'scripts.convert_checkpoint', '--from', 'timm',
                           str(not_safetensors), str(tmp_path / 'out')],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith(f'error: {not_safetensors}: not a safetensors file')
  assert not (tmp_path / 'out').exists()


def test_models_timm_cannot_hold_are_refused_before_anything_is_written(tmp_path):
  out = tmp_path / 'wide.safetensors'
  wide = models.model_config('nfnet', 'F0+').to_dict()
  with pytest.raises(CheckpointError, match='192 wide'):
    timm_weights.save(out, {}, wide)
  narrow_groups = models.model_config('nfnet', 'F0', depths=(1, 1, 1, 1), widths=(64, 128, 256, 256),
                                      stem_width=128).to_dict()  # 32-wide bottleneck, 128-wide groups
  with pytest.raises(CheckpointError, match='stage 0: bottleneck 32 is narrower than the group width 128'):
    timm_weights.save(out, {}, narrow_groups)
  assert not out.exists() and not list(tmp_path.iterdir())


def test_reproduce_table_picks_up_safetensors_files(tmp_path):
  (tmp_path / 'dm_nfnet_f0.safetensors').write_bytes(b'')
  (tmp_path / 'notes.txt').write_text('')
  paths, skipped = reproduce_table.checkpoint_paths(str(tmp_path))
  assert [p.name for p in paths] == ['dm_nfnet_f0.safetensors'] and len(skipped) == 1


def test_shapes_no_nfnet_can_have_are_one_line_errors():
  empty = dict(_small_shapes(), **{'stages.0.0.conv2.weight': (32, 0, 3, 3)})
  with pytest.raises(CheckpointError, match=r'^stages\.0\.0\.conv2\.weight has shape \(32, 0, 3, 3\), not a weight'):
    timm_weights.model_config_of(empty)
  extra_stage = dict(_small_shapes(), **{'stages.4.0.conv1.weight': (8, 8, 1, 1)})
  with pytest.raises(CheckpointError, match=r"unexpected key 'stages\.4\.0\.conv1\.weight'"):
    timm_weights.model_config_of(extra_stage)
