"""Tests for nfnets.models.nf_regnet: parameter counts, names, scaling table, configs, a pmapped step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import nf_regnet as nf_regnet_configs
from nfnets import flops
from nfnets import models
from nfnets.models import nf_regnet
from tests import helpers
from tests import zoo_testing

ALPHA = 0.2


def _expected_param_count(depths, widths, num_classes=1000, width=0.75, expansion=2.25, group_width=8,
                          se_ratio=0.5):
  """NF-RegNet's parameters counted from the architecture's definition, layer by layer."""
  conv = lambda k, cin, cout, groups=1: k * k * (cin // groups) * cout + 2 * cout  # WS conv: w, gain, bias
  widths = [int(w * width) for w in widths]
  channels = widths[0]
  total = conv(3, 3, channels)
  ratio = 1.0  # the network's first block keeps its width
  for stage_width, depth in zip(widths, depths):
    for i in range(depth):
      groups = int(channels * ratio) // group_width
      inner = groups * group_width
      hidden = int(inner * se_ratio)
      total += conv(1, channels, inner) + conv(3, inner, inner, groups) + conv(1, inner, stage_width)
      total += inner * hidden + hidden + hidden * inner + inner  # squeeze-excite on the expanded width
      if i == 0:  # every stage starts strided, with a projection shortcut
        total += conv(1, channels, stage_width)
      total += 1  # skip gain
      channels, ratio = stage_width, expansion
  head = 1280 * channels // 440
  return total + conv(1, channels, head) + head * num_classes + num_classes


def test_b0_has_the_reference_releases_parameter_count():
  config = models.model_config('nf_regnet', 'B0')
  assert config.activation == 'silu'
  assert flops.model_param_count(config) == 8_595_372 == _expected_param_count(
      nf_regnet.VARIANTS['B0']['depths'], nf_regnet.VARIANTS['B0']['widths'])


# The larger variants differ only in their table entries; tracing them costs seconds each.
@pytest.mark.parametrize('variant', ['B1', 'B2'])
def test_parameter_count_follows_the_architecture(variant):
  entry = nf_regnet.VARIANTS[variant]
  assert flops.model_param_count(models.model_config('nf_regnet', variant)) == _expected_param_count(
      entry['depths'], entry['widths'])


def test_scaling_grows_width_depth_and_resolution_together():
  variants = [f'B{i}' for i in range(9)]
  assert list(nf_regnet.VARIANTS) == variants
  configs = [nf_regnet_configs.get_config(v) for v in variants]
  for key in ('train_resolution', 'eval_resolution'):
    values = [getattr(c.data, key) for c in configs]
    assert values == sorted(values) and len(set(values)) == 9
  for earlier, later in zip(variants, variants[1:]):
    assert all(a <= b for a, b in zip(nf_regnet.VARIANTS[earlier]['widths'], nf_regnet.VARIANTS[later]['widths']))
    assert all(a <= b for a, b in zip(nf_regnet.VARIANTS[earlier]['depths'], nf_regnet.VARIANTS[later]['depths']))
  assert (configs[0].data.train_resolution, configs[0].data.eval_resolution) == (192, 224)
  assert (configs[8].data.train_resolution, configs[8].data.eval_resolution) == (600, 672)
  assert [c.model.drop_rate for c in configs] == [0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5]
  assert [c.optimizer.weight_decay for c in configs[:6]] == [5e-5, 6e-5, 7e-5, 8e-5, 9e-5, 1e-4]
  b0 = configs[0]
  assert (b0.optimizer.clip_mode, b0.train.batch_size, b0.optimizer.base_learning_rate) == ('none', 1024, 0.4)
  assert (b0.data.mix, b0.data.randaugment_layers, b0.precision.compute_dtype) == ('mixup_cutmix', 0, 'float32')
  with pytest.raises(ValueError, match="unknown NF-RegNet variant 'B9'"):
    nf_regnet_configs.get_config('B9')


def test_module_names_and_shapes():
  params, state = models.abstract_params(models.model_config('nf_regnet', 'B0'))
  assert state == {}
  shapes = helpers.module_shapes(params)
  assert shapes['NF_RegNet/~/initial_conv']['w'] == (3, 3, 3, 36)
  # Block 0 keeps its width (ratio 1): 36 channels -> 4 groups of 8 = 32.
  assert shapes['NF_RegNet/~/nf_block/~/conv1']['w'] == (3, 3, 8, 32)
  # Block 2 (stage 2's second): 78 * 2.25 = 175 -> 21 groups of 8 = 168, squeeze-excite to 84.
  assert shapes['NF_RegNet/~/nf_block_2/~/conv0']['w'] == (1, 1, 78, 168)
  assert shapes['NF_RegNet/~/nf_block_2/~/conv1']['w'] == (3, 3, 8, 168)
  assert shapes['NF_RegNet/~/nf_block_2/~/squeeze_excite/~/linear']['w'] == (168, 84)
  stage_starts = [i for i in range(16) if f'NF_RegNet/~/nf_block_{i}/~/conv_shortcut' in shapes]
  assert 'NF_RegNet/~/nf_block/~/conv_shortcut' in shapes and stage_starts == [1, 4, 10]
  assert shapes['NF_RegNet/~/final_conv']['w'] == (1, 1, 330, 960)
  assert shapes['NF_RegNet/~/linear']['w'] == (960, 1000)
  assert models.get_family('nf_regnet').classifier_module == 'NF_RegNet/~/linear'


def test_signal_propagation_at_init():
  model = models.model_config('nf_regnet', 'B0', depths=(1, 3, 2, 1), widths=(32, 48, 64, 64), num_classes=10)
  zoo_testing.check_signal_propagation(model, alpha=ALPHA)


def test_bad_arguments():
  with pytest.raises(models.ConfigError, match="unknown nf_regnet variant 'B9'"):
    models.abstract_params(dict(models.model_config('nf_regnet', 'B0'), variant='B9'))
  with pytest.raises(models.ConfigError, match='4 stages'):
    models.abstract_params(models.model_config('nf_regnet', 'B0', widths=(8, 16, 24)))
  with pytest.raises(models.ConfigError, match="Unknown grouped_conv mode 'fast'"):
    models.abstract_params(models.model_config('nf_regnet', 'B0', grouped_conv='fast'))


@pytest.mark.slow
def test_a_pmapped_train_step_updates_every_replica_alike():
  config = zoo_testing.short_run(nf_regnet_configs.get_config('tiny'))
  step = zoo_testing.PmappedStep(config)
  (after_one, _), (after_two, metrics) = step.run([zoo_testing.random_batch(seed=i) for i in range(2)])
  before = step.initial_state
  # The classifier starts at zero (as in the reference), so the first step trains it alone: nothing below it
  # gets a gradient yet. From the second step on the body learns too.
  np.testing.assert_array_equal(before.params['NF_RegNet/~/linear']['w'], 0.0)
  assert np.any(after_one.params['NF_RegNet/~/linear']['w'] != 0)
  assert all(p['skip_gain'] == 0 for p in after_one.params.values() if 'skip_gain' in p)
  assert np.isfinite(metrics['loss'])
  skip_gains = [p['skip_gain'] for p in after_two.params.values() if 'skip_gain' in p]
  assert len(skip_gains) == 4 and all(g != 0 for g in skip_gains)
  assert jax.tree.map(jnp.shape, after_two.model_state) == {}
