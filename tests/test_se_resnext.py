"""Tests for nfnets.models.se_resnext, the batch-normalised baseline: topology shared with NFNet, batch
normalisation (float32 under bfloat16, statistics synchronised across devices, moving averages in eval),
and a BN run that resumes bitwise with its statistics and their EMA."""
import os

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

from configs import nfnet as nfnet_configs
from configs import se_resnext as se_resnext_configs
from nfnets import checkpoint
from nfnets import evaluate
from nfnets import flops
from nfnets import models
from nfnets import optim
from nfnets import trainer
from nfnets.data import ops_image
from nfnets.data import pipeline
from nfnets.models import nfnet
from nfnets.models import se_resnext
from tests import zoo_testing

STEM_BN = 'SEResNeXtD/~/stem_bn0/batch_norm'


def _expected_param_count(depths, widths, num_classes=1000, group_width=128, se_ratio=0.5):
  """The baseline's parameters counted from the architecture: bias-free convs, BN scale and offset."""
  conv = lambda k, cin, cout, groups=1: k * k * (cin // groups) * cout
  bn = lambda channels: 2 * channels
  stem = (16, 32, 64, widths[0] // 2)
  total = conv(3, 3, stem[0]) + sum(conv(3, a, b) for a, b in zip(stem, stem[1:])) + sum(map(bn, stem[:3]))
  channels = stem[-1]
  for depth, width in zip(depths, widths):
    for i in range(depth):
      inner, groups = nfnet.bottleneck_width(width, group_width)
      total += bn(channels) + conv(1, channels, inner) + bn(inner) + 2 * (conv(3, inner, inner, groups) + bn(inner))
      total += conv(1, inner, width)
      if i == 0:
        total += conv(1, channels, width)
      hidden = int(width * se_ratio)
      total += width * hidden + hidden + hidden * width + width
      channels = width
  return total + conv(1, channels, 2 * channels) + bn(2 * channels) + 2 * channels * num_classes + num_classes


def _tiny_config(num_steps=6):
  return zoo_testing.short_run(se_resnext_configs.get_config('tiny'), num_steps)


@pytest.mark.parametrize('variant', ['F0', 'F1', 'F0+'])
def test_parameter_count_follows_the_architecture(variant):
  entry = nfnet.VARIANTS[variant]
  assert flops.model_param_count(models.model_config('se_resnext', variant)) == _expected_param_count(
      entry['depths'], entry['widths'])


def test_same_topology_as_nfnet_with_batch_norm_instead_of_weight_standardisation():
  assert se_resnext.VARIANTS is nfnet.VARIANTS
  bn_params, bn_state = models.abstract_params(models.model_config('se_resnext', 'F0'))
  nf_params, _ = models.abstract_params(models.model_config('nfnet', 'F0'))
  to_bn = lambda name: name.replace('NFNet', 'SEResNeXtD').replace('nf_block', 'block')
  # Every NF weight has its counterpart of the same shape; WS gains, biases and skip gains are gone.
  for module, leaves in nf_params.items():
    for name, leaf in leaves.items():
      if name in ('gain', 'bias', 'skip_gain'):
        assert name not in bn_params.get(to_bn(module), {})
      else:
        assert bn_params[to_bn(module)][name].shape == leaf.shape, (module, name)
  norms = {m: p for m, p in bn_params.items() if set(p) == {'scale', 'offset'}}
  assert len(norms) == 3 + 4 * 12 + 1  # the stem's first three convs, four per block, the head
  assert all(p['scale'].shape == p['offset'].shape and len(p['scale'].shape) == 1 for p in norms.values())
  assert set(bn_state) == {f'{m}/batch_norm/~/{e}_ema' for m in norms for e in ('mean', 'var')}
  assert models.get_family('se_resnext').classifier_module == 'SEResNeXtD/~/linear'


def test_config_is_nfnets_but_for_the_model_and_clipping():
  def flat(config, prefix=''):
    out = {}
    for key, value in config.items():
      out.update(flat(value, f'{prefix}{key}.') if isinstance(value, dict) else {prefix + key: value})
    return out

  bn, nf = flat(se_resnext_configs.get_config('F3').to_dict()), flat(nfnet_configs.get_config('F3').to_dict())
  differing = {k for k in set(bn) | set(nf) if bn.get(k) != nf.get(k)}
  assert differing == {'model.name', 'model.alpha', 'model.bn_decay', 'model.cross_replica_axis',
                       'optimizer.clip_mode'}
  assert bn['optimizer.clip_mode'] == 'none' and bn['model.drop_rate'] == nf['model.drop_rate'] == 0.4
  with pytest.raises(ValueError, match="unknown SE-ResNeXt-D variant 'F9'"):
    se_resnext_configs.get_config('F9')


def test_batch_norm_trains_on_batch_statistics_and_evaluates_on_moving_averages():
  def norm(x, is_training):
    return se_resnext.BatchNorm(decay_rate=0.9, cross_replica_axis='batch', name='bn')(x, is_training)

  model = hk.transform_with_state(norm)
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 5, 5, 4)).astype(np.float32)
  params, state = model.init(None, x, is_training=True)
  assert {k: v.shape for k, v in params['bn'].items()} == {'scale': (4,), 'offset': (4,)}
  params = {'bn': {'scale': np.float32([1, 2, 3, 4]), 'offset': np.float32([0, 1, 0, -1])}}
  # Outside a pmap over 'batch' the statistics are the local batch's.
  train_out, state = model.apply(params, state, None, x, is_training=True)
  expected = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5) * params['bn']['scale'] + params['bn']['offset']
  np.testing.assert_allclose(train_out, expected, rtol=1e-4, atol=1e-4)
  assert int(state['bn/batch_norm/~/mean_ema']['counter']) == 1
  # After one update the (zero-debiased) moving averages are that batch's statistics.
  eval_out, eval_state = model.apply(params, state, None, x, is_training=False)
  np.testing.assert_allclose(eval_out, train_out, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(eval_state), jax.tree.leaves(state)):  # evaluation updates nothing
    np.testing.assert_array_equal(a, b)
  shifted, _ = model.apply(params, state, None, x + 1.0, is_training=False)
  # A fixed affine map in evaluation: shifting the input shifts the output by scale / sqrt(moving var + eps).
  step = params['bn']['scale'] / np.sqrt(x.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(shifted - eval_out, np.broadcast_to(step, x.shape), rtol=1e-3)


def test_bfloat16_policy_keeps_batch_norm_in_float32():
  config = se_resnext_configs.get_config('tiny').model
  forward = models.make_forward(config, 'bfloat16', return_metrics=True)
  image = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params, state = jax.eval_shape(lambda x: forward.init(jax.random.PRNGKey(0), x, is_training=True), image)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype('float32')}
  kinds = {path[-1].key: leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
  assert kinds == {'average': np.dtype('float32'), 'hidden': np.dtype('float32'), 'counter': np.dtype('int32')}
  out, _ = jax.eval_shape(lambda p, s, x: forward.apply(p, s, jax.random.PRNGKey(0), x, is_training=True),
                          params, state, image)
  assert out['logits'].dtype == jnp.float32 and out['logits'].shape == (2, 10)
  assert list(out['signal_propagation']) == [f'SEResNeXtD/~/block{"_" + str(i) if i else ""}' for i in range(4)]
  # Without the family's float32 hook, the normalisation would run (and keep its state) in bfloat16.
  policy = jmp.get_policy('params=float32,compute=bfloat16,output=float32')

  def unhooked(x):
    with hk.mixed_precision.push_policy(se_resnext.SEResNeXtD, policy):
      return se_resnext.SEResNeXtD(**models.model_kwargs(config))(x, is_training=True)

  _, bf16_state = jax.eval_shape(hk.transform_with_state(unhooked).init, jax.random.PRNGKey(0), image)
  assert jax.tree.leaves(bf16_state)[0].dtype == jnp.bfloat16


@pytest.fixture(scope='module')
def bn_step():
  """The trainer's step for the tiny baseline, compiled once for the tests below."""
  return zoo_testing.PmappedStep(_tiny_config())


def test_train_step_synchronises_batch_statistics_across_devices(bn_step):
  rng = np.random.default_rng(0)
  batch = zoo_testing.random_batch()
  # The two devices see differently distributed images.
  batch['images'][1] = rng.integers(0, 64, size=batch['images'][1].shape, dtype=np.uint8)
  [(after, metrics)] = bn_step.run([batch])
  before = bn_step.initial_state
  assert np.isfinite(metrics['loss'])

  # The first normalisation sees stem_conv0's output (computed here from the weights the step started with).
  kernel = before.params['SEResNeXtD/~/stem_conv0']['w']
  images = ops_image.normalize(batch['images'].reshape(-1, 32, 32, 3))  # as the step normalises them
  features = np.asarray(jax.lax.conv_general_dilated(
      images, kernel, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  mean, var = features.mean((0, 1, 2)), features.var((0, 1, 2))
  per_device_var = features.reshape(2, -1, features.shape[-1]).var(1).mean(0)
  assert np.mean(np.abs(per_device_var - var) / var) > 0.2  # the test can tell global from per-device
  state = after.model_state
  np.testing.assert_allclose(state[f'{STEM_BN}/~/mean_ema']['average'].ravel(), mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state[f'{STEM_BN}/~/var_ema']['average'].ravel(), var, rtol=1e-4)

  # The statistics are EMA'd like the weights (first step's decay: 0.1); counters stay integers, not averaged.
  decay = float(optim.ema_decay_at(0, bn_step.config.optimizer.ema_decay))
  old_leaves = dict(jax.tree_util.tree_leaves_with_path(before.model_state))
  new_leaves = dict(jax.tree_util.tree_leaves_with_path(state))
  for path, ema in jax.tree_util.tree_leaves_with_path(after.ema_model_state):
    if path[-1].key == 'counter':
      assert ema.dtype == np.int32 and int(ema) == int(new_leaves[path]) == 1
    else:
      np.testing.assert_allclose(ema, decay * old_leaves[path] + (1 - decay) * new_leaves[path], rtol=1e-5,
                                 atol=1e-6)


@pytest.mark.slow
def test_interrupted_bn_run_resumes_bitwise_statistics_included(bn_step, tmp_path):
  config = bn_step.config
  workdir = str(tmp_path / 'run')
  assert trainer.train_and_evaluate(config, workdir, stop_after_step=3) == {}
  results = trainer.train_and_evaluate(config, workdir)
  resumed = checkpoint.read(os.path.join(workdir, 'checkpoints'))

  # Uninterrupted: the same step on the same six batches of the trainer's input pipeline.
  batches = pipeline.make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                         seed=config.seed, num_classes=config.model.num_classes)
  try:
    expected, _ = bn_step.run([next(batches) for _ in range(config.train.num_steps)])[-1]
  finally:
    if hasattr(batches, 'close'):
      batches.close()
  assert resumed.step == 6
  for prefix, (params, state) in (('', (expected.params, expected.model_state)),
                                  ('ema_', (expected.ema_params, expected.ema_model_state))):
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves(resumed.weight_sets[prefix])):
      np.testing.assert_array_equal(a, b)
  assert int(expected.model_state[f'{STEM_BN}/~/mean_ema']['counter']) == 6
  assert not np.allclose(expected.model_state[f'{STEM_BN}/~/var_ema']['average'],
                         expected.ema_model_state[f'{STEM_BN}/~/var_ema']['average'])
  # Evaluating the checkpoint (moving averages and their EMA from the checkpoint) reproduces the final eval.
  assert evaluate.evaluate_checkpoint(config, workdir) == results
