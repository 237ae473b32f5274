"""The optimizer chain against a plain-numpy reading of the paper's update order, plus schedule, SAM and EMA."""
import functools
import math
import types

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import configs
from configs import common
from nfnets import agc
from nfnets import models
from nfnets import param_paths
from nfnets.models import nfnet
from nfnets import optim


def optimizer_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name='sgd', base_learning_rate=0.1, reference_batch_size=256, warmup_epochs=1.0, schedule='cosine',
      momentum=0.9, nesterov=True, weight_decay=2e-5, clip_mode='agc', agc_lambda=0.01, agc_eps=1e-3,
      global_norm_threshold=1.0, sam_rho=0.0, adam_b1=0.9, adam_b2=0.999, ema_decay=0.99999))
  config.update(overrides)
  return config


@functools.lru_cache(maxsize=1)
def nfnet_shapes():
  forward = hk.transform(lambda x: nfnet.NFNet(num_classes=10, variant='F0', depths=(1, 1, 1, 1),
                                               widths=(32, 64, 96, 128))(x, is_training=True))
  return jax.eval_shape(forward.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def nfnet_params(seed=0):
  """A small real NFNet tree filled like an initialised one (random weights, unit gains, zero skip gains)."""
  rng = np.random.default_rng(seed)

  def fill(key_path, shape):
    _, name = param_paths.param_path(key_path)
    if name == 'w':
      return (rng.normal(size=shape.shape) / math.sqrt(np.prod(shape.shape[:-1]))).astype(np.float32)
    if name == 'gain':
      return (1.0 + 0.1 * rng.normal(size=shape.shape)).astype(np.float32)
    if name == 'skip_gain':
      return np.zeros(shape.shape, np.float32)
    return (0.01 * rng.normal(size=shape.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, nfnet_shapes())


def random_grads(rng, params):
  """Gradients whose scale varies over four decades so that some units clip and some do not."""
  return jax.tree.map(lambda p: (rng.normal(size=p.shape) * 10.0**rng.uniform(-5, -1)).astype(np.float32), params)


def numpy_lr(step, peak, warmup_steps, total_steps, schedule='cosine'):
  if step < warmup_steps:
    return peak * step / warmup_steps
  if schedule == 'constant':
    return peak
  return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def numpy_clip(grads, params, mode, clipping):
  if mode == 'none':
    return grads
  if mode == 'global_norm':
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64)**2)) for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda g: g * min(1.0, clipping / norm), grads)
  clipped = {}
  for module, leaves in grads.items():
    clipped[module] = {}
    for name, g in leaves.items():
      g = g.astype(np.float64)
      if (module, name) == ('NFNet/~/linear', 'w'):
        clipped[module][name] = g
        continue
      axes = None if g.ndim <= 1 else tuple(range(g.ndim - 1))
      g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
      w_norm = np.maximum(np.sqrt(np.sum(params[module][name].astype(np.float64)**2, axis=axes, keepdims=True)),
                          1e-3)
      ratio_exceeded = g_norm / w_norm > clipping
      clipped[module][name] = np.where(ratio_exceeded, g * clipping * w_norm / np.maximum(g_norm, 1e-6), g)
  return clipped


def numpy_sgd_run(params, grads_per_step, config, *, batch_size, examples_per_epoch, total_steps):
  """clip -> g += wd * w (weights only) -> Nesterov momentum -> w -= lr(step) * d, in float64."""
  peak = config.base_learning_rate * batch_size / config.reference_batch_size
  warmup_steps = math.ceil(config.warmup_epochs * examples_per_epoch / batch_size)
  params = jax.tree.map(lambda p: p.astype(np.float64), params)
  trace = jax.tree.map(np.zeros_like, params)
  for step, grads in enumerate(grads_per_step):
    threshold = config.global_norm_threshold if config.clip_mode == 'global_norm' else config.agc_lambda
    grads = numpy_clip(grads, params, config.clip_mode, threshold)
    grads = jax.tree.map(lambda g, p: g + config.weight_decay * p if p.ndim >= 2 else g, grads, params)
    trace = jax.tree.map(lambda t, g: g + config.momentum * t, trace, grads)
    direction = jax.tree.map(lambda t, g: g + config.momentum * t, trace, grads)
    lr = numpy_lr(step, peak, warmup_steps, total_steps, config.schedule)
    params = jax.tree.map(lambda p, d: p - lr * d, params, direction)
  return params


def run_optimizer(optimizer, params, grads_per_step):
  """Steps `optimizer` under one jit (update and apply together); returns params and clipped fractions."""

  @jax.jit
  def step(params, state, grads):
    updates, state = optimizer.update(grads, state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state, agc.clipped_fraction(state)

  state = jax.jit(optimizer.init)(params)
  fractions = []
  for grads in grads_per_step:
    params, state, fraction = step(params, state, grads)
    fractions.append(fraction)
  return params, fractions


def small_params(seed=0):
  """A hand-made tree in the same Haiku layout: one conv, one SE linear, a skip gain, the classifier."""
  rng = np.random.default_rng(seed)
  shapes = {'NFNet/~/nf_block/~/conv1': {'w': (3, 3, 4, 6), 'gain': (6,), 'bias': (6,)},
            'NFNet/~/nf_block/~/squeeze_excite/linear': {'w': (6, 3), 'b': (3,)},
            'NFNet/~/nf_block': {'skip_gain': ()},
            'NFNet/~/linear': {'w': (6, 5), 'b': (5,)}}
  return {m: {n: (rng.normal(size=s) * 0.3).astype(np.float32) for n, s in leaves.items()}
          for m, leaves in shapes.items()}


def assert_trees_close(result, expected, **tolerances):
  for module in expected:
    for name in expected[module]:
      np.testing.assert_allclose(result[module][name], expected[module][name], err_msg=f'{module}/{name}',
                                 **tolerances)


# 2 warmup steps then 4 cosine steps; batch 512 doubles the base rate.
CHAIN_SIZES = dict(batch_size=512, examples_per_epoch=1024, total_steps=6)


def test_agc_chain_matches_numpy_update_order_across_warmup_into_cosine_on_a_real_nfnet():
  config = optimizer_config(weight_decay=0.05)
  params = nfnet_params()
  rng = np.random.default_rng(1)
  grads_per_step = [random_grads(rng, params) for _ in range(6)]
  result, fractions = run_optimizer(optim.build_optimizer(config, **CHAIN_SIZES), params, grads_per_step)
  assert_trees_close(result, numpy_sgd_run(params, grads_per_step, config, **CHAIN_SIZES), rtol=1e-5, atol=1e-7)
  assert any(0 < float(f) < 1 for f in fractions)


@pytest.mark.parametrize('clip_mode', ['global_norm', 'none'])
def test_other_clip_modes_match_numpy(clip_mode):
  config = optimizer_config(clip_mode=clip_mode, global_norm_threshold=0.05, weight_decay=0.05)
  params = small_params()
  rng = np.random.default_rng(2)
  grads_per_step = [random_grads(rng, params) for _ in range(6)]
  result, fractions = run_optimizer(optim.build_optimizer(config, **CHAIN_SIZES), params, grads_per_step)
  assert_trees_close(result, numpy_sgd_run(params, grads_per_step, config, **CHAIN_SIZES), rtol=1e-5, atol=1e-7)
  assert all(f is None for f in fractions)


def test_masks_pick_exactly_the_intended_leaves_of_a_real_nfnet():
  shapes = nfnet_shapes()
  decayed = {(m, n) for m in shapes for n in shapes[m] if optim.weight_decay_mask(shapes)[m][n]}
  weights = {(m, n) for m in shapes for n in shapes[m] if n == 'w'}
  assert decayed == weights
  assert ('NFNet/~/linear', 'w') in decayed
  assert not any(n in ('gain', 'bias', 'b', 'skip_gain') for _, n in decayed)


def test_learning_rate_schedule_values():
  config = optimizer_config(warmup_epochs=2.5)
  schedule = optim.learning_rate_schedule(config, batch_size=1024, examples_per_epoch=4096, total_steps=40)
  for step in (0, 3, 9, 10, 11, 25, 39, 40):
    assert float(schedule(step)) == pytest.approx(numpy_lr(step, 0.4, 10, 40), abs=1e-7)
  constant = optim.learning_rate_schedule(optimizer_config(schedule='constant', warmup_epochs=0), batch_size=256,
                                          examples_per_epoch=1024, total_steps=40)
  assert [float(constant(s)) for s in (0, 20, 39)] == pytest.approx([0.1, 0.1, 0.1])


def test_adamw_steps_and_decays_only_masked_leaves():
  config = optimizer_config(name='adamw', warmup_epochs=0, weight_decay=0.1, base_learning_rate=0.01,
                            clip_mode='none')
  params = small_params()
  zero_grads = jax.tree.map(np.zeros_like, params)
  # With zero gradients Adam's first step is 0, so the update is the decoupled decay -lr * wd * w alone.
  optimizer = optim.build_optimizer(config, batch_size=256, examples_per_epoch=2560, total_steps=100)
  after_one, _ = run_optimizer(optimizer, params, [zero_grads])
  expected = jax.tree.map(lambda p: p * (1 - 0.01 * 0.1) if p.ndim >= 2 else p, params)
  assert_trees_close(after_one, expected, rtol=1e-6)
  stepped, _ = run_optimizer(optimizer, params, [zero_grads, random_grads(np.random.default_rng(2), params)])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(stepped))
  assert not np.allclose(stepped['NFNet/~/nf_block/~/conv1']['gain'], params['NFNet/~/nf_block/~/conv1']['gain'])


def quadratic_loss(params, batch):
  """A smooth non-quadratic loss so that the gradient at the SAM-perturbed point differs."""
  return sum(jnp.mean(jnp.sum(jnp.tanh(p * x) ** 2)) for p, x in zip(jax.tree.leaves(params), batch))


def test_sam_follows_the_documented_pmapped_calling_convention():
  config = optimizer_config(sam_rho=0.05, warmup_epochs=0, clip_mode='agc')
  sizes = dict(batch_size=256, examples_per_epoch=2560, total_steps=100)
  assert optim.needs_grad_fn(config) and not optim.needs_grad_fn(optimizer_config())
  sam = optim.build_optimizer(config, **sizes)
  plain = optim.build_optimizer(optimizer_config(warmup_epochs=0, clip_mode='agc'), **sizes)
  params = {'NFNet/~/conv': {'w': np.full((3, 3, 2, 4), 0.5, np.float32), 'gain': np.ones(4, np.float32)},
            'NFNet/~/linear': {'w': np.full((4, 3), 0.3, np.float32), 'b': np.zeros(3, np.float32)}}
  rng = np.random.default_rng(3)
  devices = jax.local_device_count()
  # One data shard per device; each leaf gets its own "input" multiplying the parameter.
  batch = [rng.normal(size=(devices,) + p.shape).astype(np.float32) for p in jax.tree.leaves(params)]

  def train_step(params, opt_state, local_batch):
    grads = jax.lax.pmean(jax.grad(quadratic_loss)(params, local_batch), 'batch')

    def grad_fn(perturbed_params, adv_step):
      del adv_step
      return jax.lax.pmean(jax.grad(quadratic_loss)(perturbed_params, local_batch), 'batch')

    return sam.update(grads, opt_state, params, grad_fn=grad_fn)

  replicate = lambda tree: jax.tree.map(lambda x: np.broadcast_to(x, (devices,) + np.shape(x)), tree)
  opt_state = replicate(jax.jit(sam.init)(params))
  updates, state = jax.pmap(train_step, axis_name='batch')(replicate(params), opt_state, batch)
  updates = jax.tree.map(lambda x: x[0], updates)
  assert agc.clipped_fraction(state).shape == (devices,)

  # The same step by hand on one device: ascend rho along the normalised mean gradient, take the mean
  # gradient there, and feed it through the plain chain at the unperturbed params.
  @jax.jit
  def by_hand(params, batch):
    def mean_grad(p):
      per_device = [jax.grad(quadratic_loss)(p, [x[d] for x in batch]) for d in range(devices)]
      return jax.tree.map(lambda *g: sum(g) / devices, *per_device)

    grads = mean_grad(params)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    perturbed = jax.tree.map(lambda p, g: p + 0.05 * g / norm, params, grads)
    expected, _ = plain.update(mean_grad(perturbed), plain.init(params), params)
    plain_updates, _ = plain.update(grads, plain.init(params), params)
    return expected, plain_updates

  expected, plain_updates = by_hand(params, batch)
  assert_trees_close(updates, expected, rtol=1e-5, atol=1e-9)
  assert not all(np.allclose(updates[m][n], plain_updates[m][n]) for m in params for n in params[m])


@pytest.mark.parametrize('overrides, message', [
    (dict(name='lamb'), 'optimizer'),
    (dict(clip_mode='adaptive'), 'clip_mode'),
    (dict(schedule='linear'), 'schedule'),
    (dict(warmup_epochs=10.0), 'warmup'),
    (dict(sam_rho=-0.1), 'sam_rho'),
    (dict(agc_lambda=0.0), 'clipping must be > 0'),
    (dict(clip_mode='global_norm', global_norm_threshold=0.0), 'global_norm_threshold must be > 0'),
    (dict(clipping=0.02), 'optimizer.clipping was renamed: use optimizer.agc_lambda'),
])
def test_bad_settings_raise_clear_errors(overrides, message):
  config = optimizer_config(**overrides)
  with pytest.raises(ValueError, match=message):
    optim.build_optimizer(config, batch_size=256, examples_per_epoch=2560, total_steps=100)


def test_ema_decay_schedule_and_update():
  assert float(optim.ema_decay_at(0, 0.99999)) == pytest.approx(0.1)
  assert float(optim.ema_decay_at(10, 0.99999)) == pytest.approx(11 / 20)
  assert float(optim.ema_decay_at(10**7, 0.99999)) == pytest.approx(0.99999)
  assert float(optim.ema_decay_at(10**7, 0.999)) == pytest.approx(0.999)
  ema = {'m': {'w': np.ones((2, 2), np.float32)}}
  params = {'m': {'w': jnp.full((2, 2), 3.0, jnp.bfloat16)}}
  updated = jax.jit(optim.update_ema, static_argnums=3)(ema, params, jnp.int32(10), 0.99999)
  assert updated['m']['w'].dtype == jnp.float32
  np.testing.assert_allclose(updated['m']['w'], 0.55 * 1.0 + 0.45 * 3.0, rtol=1e-6)


def test_ema_of_model_state_takes_counters_as_they_are():
  # Batch norm's moving averages carry an int32 update counter: a count, not an estimate to average.
  ema = {'bn': {'average': np.zeros(3, np.float32), 'counter': np.int32(4)}}
  state = {'bn': {'average': np.ones(3, np.float32), 'counter': np.int32(7)}}
  updated = optim.update_ema(ema, state, jnp.int32(0), 0.999)
  assert updated['bn']['counter'].dtype == jnp.int32 and int(updated['bn']['counter']) == 7
  np.testing.assert_allclose(updated['bn']['average'], 0.9, rtol=1e-6)


def test_a_stored_config_with_the_old_clipping_field_reads_as_the_field_its_mode_used():
  def old(clip_mode, clipping):
    stored = configs.for_model(models.model_config('nfnet', 'F0')).to_dict()
    optimizer = stored['optimizer']
    del optimizer['agc_lambda'], optimizer['global_norm_threshold']
    optimizer.update(clip_mode=clip_mode, clipping=clipping)
    return stored

  recipe = common.optimizer_config()
  agc_run = configs.upgrade(old('agc', 0.04))['optimizer']
  assert (agc_run['agc_lambda'], agc_run['global_norm_threshold']) == (0.04, recipe.global_norm_threshold)
  norm_run = configs.upgrade(old('global_norm', 2.0))['optimizer']
  assert (norm_run['agc_lambda'], norm_run['global_norm_threshold']) == (recipe.agc_lambda, 2.0)
  assert 'clipping' not in agc_run and 'clipping' not in norm_run
  stored = old('agc', 0.04)
  assert configs.upgrade(configs.upgrade(stored)) == configs.upgrade(stored) and 'clipping' in stored['optimizer']
  # An old project checkpoint evaluated without --config: its run's config, in today's names.
  loaded = types.SimpleNamespace(config=stored, model_config=stored['model'], path='old')
  assert configs.for_checkpoint(loaded).optimizer.agc_lambda == 0.04


def test_agc_leaves_the_registry_classifier_unclipped():
  config = optimizer_config(clip_mode='agc', agc_lambda=0.01)
  params = {'Net/~/head': {'w': np.ones((4, 3), np.float32), 'b': np.ones((3,), np.float32)},
            'Net/~/linear': {'w': np.ones((4, 3), np.float32)}}
  grads = jax.tree.map(lambda p: 100.0 * p, params)
  clip = optim.clipping_transform(config, classifier_module='Net/~/head')
  updates, _ = clip.update(grads, clip.init(params), params)
  np.testing.assert_array_equal(updates['Net/~/head']['w'], grads['Net/~/head']['w'])  # the classifier weight
  assert np.all(np.abs(updates['Net/~/head']['b']) < np.abs(grads['Net/~/head']['b']))  # its bias is clipped
  assert np.all(np.abs(updates['Net/~/linear']['w']) < 100.0)  # not the classifier here: clipped


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_trainable_module_alone_steps_as_in_the_full_chain_and_the_rest_stays_bitwise(name):
  config = optimizer_config(name=name, warmup_epochs=0, weight_decay=1e-2)  # AGC, decay and momentum all act
  params = small_params()
  rng = np.random.default_rng(4)
  grads = [random_grads(rng, params) for _ in range(3)]
  sizes = dict(batch_size=256, examples_per_epoch=2560, total_steps=100)
  classifier = 'NFNet/~/linear'
  frozen_backbone = optim.build_optimizer(config, **sizes, trainable_module=classifier)
  trained, _ = run_optimizer(frozen_backbone, params, grads)
  everything, _ = run_optimizer(optim.build_optimizer(config, **sizes), params, grads)
  for module, leaves in params.items():
    for leaf, value in leaves.items():
      if module == classifier:
        # Every link of the chain works leaf by leaf, so the classifier moves as in the unfrozen run.
        np.testing.assert_allclose(trained[module][leaf], everything[module][leaf], rtol=1e-6)
        assert not np.array_equal(trained[module][leaf], value)
      else:
        np.testing.assert_array_equal(trained[module][leaf], value)
  # The frozen weights keep no optimiser state (no momentum, no Adam moments).
  state_size = sum(np.size(x) for x in jax.tree.leaves(frozen_backbone.init(params)))
  classifier_size = sum(np.size(x) for x in params[classifier].values())
  assert state_size <= 2 * classifier_size + 8


def test_ema_of_an_unchanged_weight_stays_bitwise_equal():
  params = nfnet_params(seed=3)
  ema = params
  update = jax.jit(optim.update_ema, static_argnums=3)
  for step in range(12):  # the decay ramps through values where d * w + (1 - d) * w != w
    ema = update(ema, params, jnp.int32(step), 0.999)
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
