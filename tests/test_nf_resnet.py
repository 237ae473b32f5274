"""Tests for nfnets.models.nf_resnet: parameter counts, names, signal bookkeeping, configs, a pmapped step."""
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import nf_resnet as nf_resnet_configs
from nfnets import flops
from nfnets import models
from nfnets.models import nf_resnet
from tests import helpers
from tests import zoo_testing

ALPHA = 0.2


def _expected_param_count(depths, widths, num_classes=1000, use_se=False, se_ratio=0.25):
  """NF-ResNet's parameters counted from the architecture's definition, layer by layer."""
  conv = lambda k, cin, cout: k * k * cin * cout + 2 * cout  # WS conv: weight, gain, bias
  total = conv(7, 3, widths[0] // 4)
  channels = widths[0] // 4
  for stage, (depth, width) in enumerate(zip(depths, widths)):
    for i in range(depth):
      bottleneck = width // 4
      total += conv(1, channels, bottleneck) + conv(3, bottleneck, bottleneck) + conv(1, bottleneck, width)
      if i == 0 and (stage > 0 or channels != width):
        total += conv(1, channels, width)
      if use_se:
        hidden = int(width * se_ratio)
        total += width * hidden + hidden + hidden * width + width
      total += 1  # skip gain
      channels = width
  return total + channels * num_classes + num_classes


def test_resnet50_has_the_reference_releases_parameter_count():
  config = models.model_config('nf_resnet', 'ResNet50')
  assert flops.model_param_count(config) == 25_557_048 == _expected_param_count((3, 4, 6, 3), nf_resnet.WIDTHS)


def test_variant_table():
  assert {v: e['depths'] for v, e in nf_resnet.VARIANTS.items()} == {
      'ResNet26': (2, 2, 2, 2), 'ResNet50': (3, 4, 6, 3), 'ResNet101': (3, 4, 23, 3), 'ResNet152': (3, 8, 36, 3),
      'ResNet200': (3, 24, 36, 3), 'ResNet288': (24, 24, 24, 24), 'ResNet600': (50, 50, 50, 50)}


# The deeper variants differ only in their table entry; tracing them costs seconds each.
@pytest.mark.parametrize('variant', ['ResNet26', 'ResNet101'])
def test_parameter_count_follows_the_architecture(variant):
  depths = nf_resnet.VARIANTS[variant]['depths']
  assert flops.model_param_count(models.model_config('nf_resnet', variant)) == _expected_param_count(
      depths, nf_resnet.WIDTHS)


def test_width_multiplier_squeeze_excite_and_class_count():
  config = models.model_config('nf_resnet', 'ResNet50', width=0.5, use_se=True, num_classes=10)
  widths = tuple(w // 2 for w in nf_resnet.WIDTHS)
  assert flops.model_param_count(config) == _expected_param_count((3, 4, 6, 3), widths, 10, use_se=True)


def test_module_names_and_shapes():
  params, state = models.abstract_params(models.model_config('nf_resnet', 'ResNet50'))
  assert state == {}
  shapes = helpers.module_shapes(params)
  assert shapes['NF_ResNet/~/initial_conv']['w'] == (7, 7, 3, 64)
  block = lambda i: 'NF_ResNet/~/nf_res_block' + (f'_{i}' if i else '')
  stage_starts = [i for i in range(16) if f'{block(i)}/~/conv_shortcut' in shapes]
  assert stage_starts == [0, 3, 7, 13]
  assert shapes[f'{block(3)}/~/conv_shortcut']['w'] == (1, 1, 256, 512)
  assert shapes[f'{block(3)}/~/conv1']['w'] == (3, 3, 128, 128)
  assert shapes[f'{block(15)}/~/conv2']['w'] == (1, 1, 512, 2048)
  assert shapes[block(15)]['skip_gain'] == ()
  assert shapes['NF_ResNet/~/linear']['w'] == (2048, 1000)
  assert not any('squeeze_excite' in m for m in shapes)
  assert models.get_family('nf_resnet').classifier_module == 'NF_ResNet/~/linear'


def test_betas_and_stochastic_depth_rates_follow_the_bookkeeping():
  def bookkeeping():
    model = nf_resnet.NFResNet(10, depths=(1, 2, 3, 1), widths=(8, 16, 24, 32), alpha=ALPHA)
    return [b.plan.beta for b in model.blocks], [b.plan.stochdepth_rate for b in model.blocks]

  betas, rates = hk.transform(bookkeeping).apply({}, None)
  variance, expected = 1.0, []
  for depth in (1, 2, 3, 1):
    for i in range(depth):
      expected.append(1 / math.sqrt(variance))
      variance = (1.0 if i == 0 else variance) + ALPHA**2
  np.testing.assert_allclose(betas, expected, rtol=1e-12)
  np.testing.assert_allclose(rates, [0.1 * i / 7 for i in range(7)])


def test_signal_propagation_at_init():
  model = models.model_config('nf_resnet', 'ResNet26', depths=(1, 3, 2, 1), widths=(32, 48, 64, 64),
                              num_classes=10)
  zoo_testing.check_signal_propagation(model, alpha=ALPHA)


def test_configs_and_bad_arguments():
  config = nf_resnet_configs.get_config('ResNet101')
  assert (config.model.variant, config.train.batch_size, config.train.epochs) == ('ResNet101', 1024, 90.0)
  assert (config.optimizer.clip_mode, config.data.mix, config.data.randaugment_layers) == ('agc', 'none', 0)
  with pytest.raises(ValueError, match="unknown NF-ResNet variant 'ResNet51'"):
    nf_resnet_configs.get_config('ResNet51')
  with pytest.raises(models.ConfigError, match="unknown nf_resnet variant 'ResNet51'"):
    models.abstract_params(dict(models.model_config('nf_resnet', 'ResNet50'), variant='ResNet51'))
  with pytest.raises(models.ConfigError, match='4 stages'):
    models.abstract_params(models.model_config('nf_resnet', 'ResNet50', depths=(1, 1)))


@pytest.mark.slow
def test_a_pmapped_train_step_updates_every_replica_alike():
  config = zoo_testing.short_run(nf_resnet_configs.get_config('tiny'))
  assert config.optimizer.clip_mode == 'agc'
  step = zoo_testing.PmappedStep(config)
  [(after, metrics)] = step.run([zoo_testing.random_batch()])
  before = step.initial_state
  assert np.isfinite(metrics['loss']) and 0 <= metrics['agc_clipped_fraction'] <= 1
  skip_gains = [p['skip_gain'] for p in after.params.values() if 'skip_gain' in p]
  assert len(skip_gains) == 4 and all(g != 0 for g in skip_gains)
  assert not np.allclose(before.params['NF_ResNet/~/linear']['w'], after.params['NF_ResNet/~/linear']['w'])
  assert jax.tree.map(jnp.shape, after.model_state) == {}
