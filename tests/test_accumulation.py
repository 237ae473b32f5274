"""Gradient accumulation and float16 loss scaling in the train step, on small models (cheap to compile).

The step is built exactly as the trainer builds it (the recipe's optimizer chain from the config), around
models small enough that each variant compiles in seconds.
"""
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from nfnets import accumulation
from nfnets import distributed
from nfnets import losses
from nfnets import optim
from nfnets import train_state as train_state_lib
from nfnets import train_step as train_step_lib
from nfnets.data import ops_image
from nfnets.errors import ConfigError

RES = 8
NUM_CLASSES = 5
PER_DEVICE = 8
TOTAL_STEPS = 100


def _convnet(images, is_training):
  del is_training
  x = hk.Conv2D(8, 3, name='conv')(images)
  x = jnp.mean(jax.nn.relu(x), axis=(1, 2))
  return hk.Linear(NUM_CLASSES, name='head')(x)


def _batchnorm_convnet(images, is_training):
  x = hk.Conv2D(8, 3, name='conv')(images)
  x = hk.BatchNorm(True, True, decay_rate=0.9, name='bn')(x, is_training=is_training)
  x = jnp.mean(jax.nn.relu(x), axis=(1, 2))
  return hk.Linear(NUM_CLASSES, name='head')(x)


def _float16_linear(images, is_training):
  """float32 master weights, float16 compute, float32 logits: what a float16 policy does to a model."""
  del is_training
  w = hk.get_parameter('w', (RES * RES * 3, NUM_CLASSES), jnp.float32, hk.initializers.VarianceScaling())
  x = images.reshape(images.shape[0], -1).astype(jnp.float16)
  return (x @ w.astype(jnp.float16)).astype(jnp.float32)


def _optimizer_config(**overrides) -> ml_collections.ConfigDict:
  config = common.optimizer_config()
  config.warmup_epochs = 0.0   # a non-zero learning rate from the first update
  config.base_learning_rate = 0.4
  config.agc_lambda = 0.02     # AGC clips some units of these models' gradients, not all (asserted)
  config.update(overrides)
  return config


def _build(model_fn, optimizer_config, accumulation_steps, loss_scale_period=None, initial_loss_scale=2.0 ** 15):
  forward = hk.transform_with_state(model_fn)
  schedule_args = dict(batch_size=2 * PER_DEVICE, examples_per_epoch=10 * 2 * PER_DEVICE, total_steps=TOTAL_STEPS)
  optimizer = optim.build_optimizer(optimizer_config, **schedule_args)
  step = train_step_lib.make_train_step(
      forward, optimizer, optim.learning_rate_schedule(optimizer_config, **schedule_args), label_smoothing=0.1,
      ema_decay=0.99, uses_grad_fn=optim.needs_grad_fn(optimizer_config), accumulation_steps=accumulation_steps,
      loss_scale_period=loss_scale_period)
  state = train_state_lib.init_train_state(forward, optimizer, jax.random.PRNGKey(0),
                                          jnp.zeros((1, RES, RES, 3), jnp.float32), initial_loss_scale)
  return step, state


def _batch(num_devices, per_device, seed):
  rng = np.random.default_rng(seed)
  n = num_devices * per_device
  # uint8 pixels, as the pipeline sends them, that the step normalises to about N(0, 1) (AGC's clipped
  # fraction below depends on their scale).
  normal = rng.normal(size=(num_devices, per_device, RES, RES, 3))
  images = np.clip(np.rint(ops_image.MEAN_RGB + ops_image.STDDEV_RGB * normal), 0, 255).astype(np.uint8)
  labels = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, n)]
  return {'images': images, 'labels': labels.reshape(num_devices, per_device, NUM_CLASSES)}


def _run(step, state, batches, num_devices):
  devices = jax.local_devices()[:num_devices]
  p_step = jax.pmap(step, axis_name=distributed.AXIS_NAME, devices=devices)
  replicated = distributed.replicate(state, distributed.AXIS_NAME, devices)
  all_metrics = []
  for batch in batches:
    replicated, metrics = p_step(replicated, batch)
    all_metrics.append(jax.tree.map(lambda m: np.asarray(m[0]), metrics))
  return distributed.unreplicate(replicated), all_metrics


def _assert_close(got, want, rtol=2e-5, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# --- the layout and its refusals ---------------------------------------------------------------------------

def _train_config(batch_size, accumulation_steps):
  return ml_collections.ConfigDict(dict(batch_size=batch_size, accumulation_steps=accumulation_steps))


def test_layout_splits_the_update_batch_over_devices_then_micro_batches():
  assert accumulation.batch_layout(_train_config(4096, 4), 8) == accumulation.BatchLayout(8, 4, 512, 128)
  assert accumulation.batch_layout(_train_config(64, 1), 2) == accumulation.BatchLayout(2, 1, 32, 32)
  config = common.base_config('nfnet', 'F0')
  config.train.accumulation_steps = 2
  spec = accumulation.per_device_batch_spec(config, num_devices=16)
  assert spec == {'images': jax.ShapeDtypeStruct((256, 192, 192, 3), jnp.uint8),
                  'labels': jax.ShapeDtypeStruct((256, 1000), jnp.float32)}


@pytest.mark.parametrize('batch_size, steps, devices, message', [
    (4096, 3, 8, 'config.train.batch_size 4096 does not split into 3 micro-batches on each of 8 devices: '
                 'it must be a multiple of accumulation_steps x devices = 24'),
    (100, 4, 8, 'config.train.batch_size 100 does not split into 4 micro-batches on each of 8 devices'),
    (64, 0, 2, 'config.train.accumulation_steps must be an integer >= 1, got 0'),
    (64, -2, 2, 'config.train.accumulation_steps must be an integer >= 1, got -2'),
])
def test_layouts_that_cannot_work_are_refused_with_one_line(batch_size, steps, devices, message):
  with pytest.raises(ConfigError) as error:
    accumulation.batch_layout(_train_config(batch_size, steps), devices)
  assert str(error.value).startswith(message) and '\n' not in str(error.value)


# --- accumulation: the same update as without it ----------------------------------------------------------

def test_four_micro_batches_take_the_update_of_the_whole_batch_with_agc_clipping():
  """k = 4 (micro-batches of 2 on each of 2 devices) against k = 1 (device batches of 8), two updates:
  the same loss, gradient norm, clipped fraction, weights, optimizer state and EMA to float32 round-off.
  AGC clips part of the units, so clipping micro-batch gradients (non-linear) would not pass."""
  step_1, state = _build(_convnet, _optimizer_config(), accumulation_steps=1)
  step_4, _ = _build(_convnet, _optimizer_config(), accumulation_steps=4)
  batches = [_batch(2, PER_DEVICE, seed) for seed in range(2)]
  whole, metrics_1 = _run(step_1, state, batches, 2)
  accumulated, metrics_4 = _run(step_4, state, batches, 2)
  for m1, m4 in zip(metrics_1, metrics_4):
    assert 0.05 < m1['agc_clipped_fraction'] < 0.95, m1['agc_clipped_fraction']
    for key in ('loss', 'top1_acc', 'grad_norm', 'agc_clipped_fraction', 'learning_rate'):
      np.testing.assert_allclose(m4[key], m1[key], rtol=2e-5, err_msg=key)
  assert metrics_1[-1]['learning_rate'] > 0
  _assert_close(accumulated, whole)
  assert not np.allclose(whole.params['head']['w'], state.params['head']['w'])

  # The comparison is sharp enough to tell a micro-batch-wise clip apart: on these batches, AGC of the
  # mean gradient differs from the mean of the micro-batches' clipped gradients far beyond its tolerance.
  forward = hk.transform_with_state(_convnet)
  clip = optim.clipping_transform(_optimizer_config())

  def grads(images, labels):
    def loss(params):
      logits, _ = forward.apply(params, state.model_state, None, ops_image.normalize(images), is_training=True)
      return losses.softmax_cross_entropy(logits, labels, label_smoothing=0.1)
    return jax.grad(loss)(state.params)

  images, labels = (batches[0][k].reshape((8, 2) + batches[0][k].shape[2:]) for k in ('images', 'labels'))
  micro_grads = [grads(images[j], labels[j]) for j in range(8)]
  clip_state = clip.init(state.params)
  mean = lambda trees: jax.tree.map(lambda *x: sum(x) / len(x), *trees)
  clipped_mean, _ = clip.update(mean(micro_grads), clip_state, state.params)
  mean_of_clipped = mean([clip.update(g, clip_state, state.params)[0] for g in micro_grads])
  difference = optax.tree.norm(jax.tree.map(jnp.subtract, clipped_mean, mean_of_clipped))
  assert difference > 1e-2 * optax.tree.norm(clipped_mean)


def test_sam_perturbs_with_the_accumulated_gradient_and_accumulates_the_second():
  config = _optimizer_config(sam_rho=0.05)
  step_1, state = _build(_convnet, config, accumulation_steps=1)
  step_2, _ = _build(_convnet, config, accumulation_steps=2)
  batches = [_batch(2, PER_DEVICE, seed) for seed in range(2)]
  whole, metrics_1 = _run(step_1, state, batches, 2)
  accumulated, metrics_2 = _run(step_2, state, batches, 2)
  np.testing.assert_allclose(metrics_2[-1]['loss'], metrics_1[-1]['loss'], rtol=2e-5)
  _assert_close(accumulated, whole)
  # SAM moved the weights differently from plain SGD on the same batches.
  plain, _ = _run(*_build(_convnet, _optimizer_config(), accumulation_steps=2), batches, 2)
  assert not np.allclose(plain.params['head']['w'], accumulated.params['head']['w'], rtol=1e-4)


def test_batchnorm_normalises_each_micro_batch_like_a_device_and_updates_its_averages_once():
  """Ghost batch norm: two micro-batches on one device give the update of one batch on each of two
  devices (statistics per micro-batch, gradients and new moving averages averaged)."""
  step_2, state = _build(_batchnorm_convnet, _optimizer_config(), accumulation_steps=2)
  step_1, _ = _build(_batchnorm_convnet, _optimizer_config(), accumulation_steps=1)
  batch = _batch(2, PER_DEVICE, seed=5)
  one_device = jax.tree.map(lambda x: x.reshape((1, 2 * PER_DEVICE) + x.shape[2:]), batch)
  micro, _ = _run(step_2, state, [one_device], 1)
  devices, _ = _run(step_1, state, [batch], 2)
  _assert_close(micro, devices)
  # The moving averages moved once: with decay 0.9 from zero, 0.1 x the mean of the two batch means.
  assert not np.allclose(micro.model_state['bn/~/mean_ema']['average'], 0.0)
  assert int(micro.model_state['bn/~/mean_ema']['counter']) == 1


# --- float16 loss scaling ------------------------------------------------------------------------------------

def _with_overflowing_targets(batch):
  # Finite targets of 3e4: the float32 loss stays finite, but its float16 backward pass at a scale of
  # 2^15 does not (the logits' cotangent is ~scale x target / batch, far above float16's 65504).
  return dict(batch, labels=batch['labels'] * np.float32(3e4))


def test_float16_overflow_skips_the_update_lowers_the_scale_and_is_not_counted_as_nonfinite():
  step, state = _build(_float16_linear, _optimizer_config(), accumulation_steps=2, loss_scale_period=2)
  good = [_batch(2, PER_DEVICE, seed) for seed in range(4)]
  bad_nan = dict(good[2], labels=good[2]['labels'].copy())
  bad_nan['labels'][0, 0, 0] = np.nan
  batches = [good[0], _with_overflowing_targets(good[1]), bad_nan, good[2], good[3]]
  states, all_metrics = [state], []
  for batch in batches:
    state, metrics = _run(step, state, [batch], 2)
    states.append(state)
    all_metrics.extend(metrics)
  scales = [float(s.loss_scale) for s in states]
  ok, overflow, nan, ok2, ok3 = all_metrics
  # 1: applied, the scale kept (period 2: one good update so far).
  assert ok['finite'] == 1 and ok['overflow'] == 0 and scales[1] == 2.0 ** 15
  assert not np.array_equal(states[1].params['~']['w'], states[0].params['~']['w'])
  # 2: overflow: skipped, scale halved, counted as an overflow, the non-finite streak untouched.
  assert overflow['finite'] == 0 and overflow['overflow'] == 1 and np.isfinite(overflow['loss'])
  assert scales[2] == 2.0 ** 14
  _assert_close(states[2].params, states[1].params, rtol=0, atol=0)
  assert int(states[2].nonfinite_streak) == 0
  assert (int(states[2].skipped_overflow), int(states[2].skipped_nonfinite)) == (1, 0)
  # 3: a NaN target is a non-finite update: skipped, the scale left alone, counted towards the streak.
  assert nan['finite'] == 0 and nan['overflow'] == 0 and scales[3] == 2.0 ** 14
  assert int(states[3].nonfinite_streak) == 1
  assert (int(nan['skipped_overflow']), int(nan['skipped_nonfinite'])) == (1, 1)
  # 4, 5: applied, gradients unscaled (finite, of the float32 size); two good updates double the scale.
  assert ok2['finite'] == ok3['finite'] == 1 and int(states[4].nonfinite_streak) == 0
  assert scales[5] == 2.0 ** 15
  assert 0 < ok3['grad_norm'] < 100 and ok3['loss_scale'] == 2.0 ** 14


def test_float16_gradients_are_unscaled_before_the_optimizer():
  """The update at scale 2^15 is the update at scale 1 (nothing scaled), to float16 round-off."""
  scaled, state = _build(_float16_linear, _optimizer_config(), 1, loss_scale_period=2000)
  unscaled, state_at_1 = _build(_float16_linear, _optimizer_config(), 1, loss_scale_period=2000,
                                initial_loss_scale=1.0)
  batch = _batch(2, PER_DEVICE, seed=7)
  after, metrics = _run(scaled, state, [batch], 2)
  after_at_1, metrics_at_1 = _run(unscaled, state_at_1, [batch], 2)
  np.testing.assert_allclose(metrics[0]['grad_norm'], metrics_at_1[0]['grad_norm'], rtol=1e-2)
  _assert_close(after.params, after_at_1.params, rtol=1e-2, atol=1e-4)


def test_at_a_loss_scale_of_one_an_overflow_is_a_nonfinite_update():
  """So a run whose float16 gradients keep overflowing still stops at max_consecutive_nonfinite."""
  step, state = _build(_float16_linear, _optimizer_config(), 1, loss_scale_period=2000, initial_loss_scale=1.0)
  bad = _batch(2, PER_DEVICE, seed=1)
  bad = dict(bad, labels=bad['labels'] * np.float32(1e9))  # overflows float16 even unscaled
  after, metrics = _run(step, state, [bad], 2)
  assert metrics[0]['finite'] == 0 and metrics[0]['overflow'] == 0
  assert (int(after.skipped_overflow), int(after.skipped_nonfinite), int(after.nonfinite_streak)) == (0, 1, 1)
  assert float(after.loss_scale) == 1.0
