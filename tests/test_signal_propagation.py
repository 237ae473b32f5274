"""Signal propagation at initialisation: the library (nfnets/studies/signal_propagation.py) and the command."""
import csv
import subprocess
import sys

import haiku as hk
import jax
import ml_collections
import numpy as np
import pytest

from configs import nfnet as nfnet_configs
from configs import se_resnext as se_resnext_configs
from nfnets import models
from nfnets.errors import UserError
from nfnets.studies import signal_propagation
from tests.helpers import REPO_ROOT

DEPTHS = (1, 3, 1, 1)   # blocks 1-3 share a stage: 2 and 3 are not transitions
WITHIN_STAGE = (2, 3)


def _tiny_model(**changes):
  return dict(nfnet_configs.get_config('tiny').model.to_dict(), depths=DEPTHS, **changes)


def test_block_statistics_on_digits_in_block_order_with_and_without_skip_gains():
  data = ml_collections.ConfigDict(dict(name='digits', data_dir=None))
  images = signal_propagation.eval_images(data, 'test', 8, 32, 0)
  assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
  assert abs(float(images.mean())) < 3 and 0.1 < float(images.std()) < 3  # normalised, not raw pixels
  blocks, values, gains_set = signal_propagation.block_statistics(_tiny_model(), images)
  assert blocks == ['NFNet/~/nf_block'] + [f'NFNet/~/nf_block_{i}' for i in range(1, 6)] and gains_set == 0
  assert all(np.all(np.isfinite(v)) and v.shape == (6,) for v in values.values())
  # At initialisation skip gains are 0: a block that is not a transition passes its input on unchanged.
  for i in WITHIN_STAGE:
    assert values['avg_var'][i] == pytest.approx(values['avg_var'][i - 1], rel=1e-5)
  assert np.all(values['res_avg_var'] > 0)
  _, with_gains, gains_set = signal_propagation.block_statistics(_tiny_model(), images, skip_gain=1.0)
  assert gains_set == 6 and with_gains['avg_var'][3] > with_gains['avg_var'][1]


def test_block_order_compares_numbers_as_numbers():
  names = ['NFNet/~/nf_block_10', 'NFNet/~/nf_block_2', 'NFNet/~/nf_block', 'NFNet/~/nf_block_1']
  assert sorted(names, key=signal_propagation.block_order) == [
      'NFNet/~/nf_block', 'NFNet/~/nf_block_1', 'NFNet/~/nf_block_2', 'NFNet/~/nf_block_10']


class _LogitsOnly(hk.Module):
  """A registered model that reports no signal propagation."""

  def __init__(self, num_classes, variant, name=None):
    super().__init__(name=name)
    self.num_classes = num_classes

  def __call__(self, x, is_training):
    return hk.Linear(self.num_classes)(x.mean(axis=(1, 2)))


def test_a_model_without_the_metrics_is_refused_in_one_line(monkeypatch):
  family = models.ModelFamily(
      name='logits_only', module=_LogitsOnly, variants={'A': {}}, classifier_module='logits_only/~/linear',
      default_model_config=lambda v: ml_collections.ConfigDict(dict(name='logits_only', variant=v, num_classes=3)))
  monkeypatch.setitem(models._FAMILIES, family.name, family)  # pylint: disable=protected-access
  with pytest.raises(UserError, match='logits_only models report no signal_propagation metrics'):
    signal_propagation.block_statistics(models.model_config('logits_only', 'A'), np.zeros((2, 8, 8, 3), np.float32))


def _within_stage_growth(rows, label):
  avg_var = {int(r['block_index']): float(r['avg_var']) for r in rows if r['model'] == label}
  res_var = {int(r['block_index']): float(r['res_avg_var']) for r in rows if r['model'] == label}
  return (sum(avg_var[i] - avg_var[i - 1] for i in WITHIN_STAGE), sum(res_var[i] for i in WITHIN_STAGE))


@pytest.mark.slow
def test_command_draws_two_configs_side_by_side(tmp_path):
  out = tmp_path / 'plots' / 'spp.png'
  depths = f'--config.model.depths={DEPTHS}'.replace(' ', '')
  result = subprocess.run(
      [sys.executable, '-m', 'scripts.signal_propagation', '--config', 'configs/nfnet.py:tiny', depths,
       '--compare', 'configs/nfnet.py:tiny', depths.replace('--config', '--compare'), '--compare.model.alpha=0.5',
       '--skip_gain=1', '--images=gaussian', '--num_images=16', '--out', str(out)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('tiny (alpha=0.2): 6 blocks, 16 images at 32², 6 skip gains set to 1;')
  assert lines[1].startswith('tiny (alpha=0.5): 6 blocks, 16 images at 32², 6 skip gains set to 1;')
  assert out.read_bytes().startswith(b'\x89PNG\r\n\x1a\n') and out.stat().st_size > 20_000
  with open(out.with_suffix('.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [(r['model'], r['block_index']) for r in rows] == [
      (label, str(i)) for label in ('tiny (alpha=0.2)', 'tiny (alpha=0.5)') for i in range(6)]
  # With skip gains at 1, each block inside a stage adds alpha^2 times its residual branch's variance
  # (up to the residual's chance correlation with its input in a narrow random network).
  growth = {}
  for label, alpha in (('tiny (alpha=0.2)', 0.2), ('tiny (alpha=0.5)', 0.5)):
    growth[alpha], residual = _within_stage_growth(rows, label)
    assert 0.5 < growth[alpha] / (alpha**2 * residual) < 2, (label, growth[alpha], residual)
  assert growth[0.5] > 3 * growth[0.2]


@pytest.mark.parametrize('args, message', [
    (['--variant', 'F1', '--config', 'configs/nfnet.py:tiny'], 'error: give --variant or --config, not both'),
    (['--compare', 'configs/nfnet.py:tiny', '--compare.model.alphaa=1'], "no config field 'alphaa'"),
    (['--variant', 'F1', '--out', 'spp.jpg'], 'error: --out must name a .png file'),
])
def test_bad_command_lines_fail_with_one_line(args, message, tmp_path):
  if '--out' not in args:
    args = args + ['--out', str(tmp_path / 'spp.png')]
  result = subprocess.run([sys.executable, '-m', 'scripts.signal_propagation', *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and message in result.stderr and result.stderr.count('\n') == 1, result.stderr
  assert not list(tmp_path.iterdir())


def test_batch_normalised_blocks_use_the_batch_statistics_and_grow_by_their_residuals():
  """SE-ResNeXt-D at initialisation, as the paper drew BN-ReLU ResNets: each residual branch ends near unit
  variance (batch normalisation, not the empty moving averages) and the blocks of a stage add them up."""
  config = se_resnext_configs.get_config('tiny').model.to_dict()
  config['depths'] = DEPTHS
  blocks, values, _ = signal_propagation.block_statistics(config, signal_propagation.gaussian_images(16, 32))
  assert len(blocks) == sum(DEPTHS)
  assert np.all((values['res_avg_var'] > 0.05) & (values['res_avg_var'] < 20)), values['res_avg_var']
  growth = sum(values['avg_var'][i] - values['avg_var'][i - 1] for i in WITHIN_STAGE)
  assert 0.5 < growth / sum(values['res_avg_var'][i] for i in WITHIN_STAGE) < 2, values


@pytest.mark.slow
def test_a_normaliser_free_model_measures_the_same_with_and_without_its_regularisers_off():
  """Off, stochastic depth and dropout leave an NF model's training-mode pass equal to its inference pass."""
  config = nfnet_configs.get_config('tiny').model.to_dict()
  images = signal_propagation.gaussian_images(8, 32)
  _, measured, _ = signal_propagation.block_statistics(config, images)
  # The same initialisation: drawing stochastic depth's keys during init would shift the weights' keys.
  forward = models.make_forward(dict(config, stochdepth_rate=0.0, drop_rate=0.0), 'float32', return_metrics=True)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(0))
  params, state = forward.init(init_rng, images[:1], is_training=True)
  inference, _ = forward.apply(params, state, None, images, is_training=False)
  blocks = sorted(inference['signal_propagation'], key=signal_propagation.block_order)
  np.testing.assert_allclose(measured['avg_var'], [inference['signal_propagation'][b]['avg_var'] for b in blocks],
                             rtol=1e-5)
  _, regularised, _ = signal_propagation.block_statistics(
      dict(config, stochdepth_rate=0.5), images, regularisers=True)
  assert not np.allclose(regularised['res_avg_var'], measured['res_avg_var'])


@pytest.mark.slow
def test_command_draws_nf_beside_bn_labelled_by_family(tmp_path):
  out = tmp_path / 'nf_vs_bn.png'
  result = subprocess.run(
      [sys.executable, '-m', 'scripts.signal_propagation', '--config', 'configs/nfnet.py:tiny',
       '--compare', 'configs/se_resnext.py:tiny', '--images=gaussian', '--num_images=8', '--out', str(out)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  with open(out.with_suffix('.csv')) as f:
    rows = list(csv.DictReader(f))
  assert sorted({r['model'] for r in rows}) == ['nfnet tiny', 'se_resnext tiny']
  bn_final = [float(r['avg_var']) for r in rows if r['model'] == 'se_resnext tiny'][-1]
  assert 0.01 < bn_final < 100  # batch statistics: no blow-up (~1e9 with the empty moving averages)
