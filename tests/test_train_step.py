"""The pure train/eval steps under pmap on 2 simulated CPU devices."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets import distributed
from nfnets import losses
from nfnets import optim
from nfnets import train_state as train_state_lib
from nfnets import train_state
from nfnets import train_step as train_step_lib
from nfnets import trainer
from nfnets.data import ops_image
from tests import tiny_setup

RES = tiny_setup.RESOLUTION
NUM_CLASSES = tiny_setup.NUM_CLASSES
PER_DEVICE = tiny_setup.BATCH_SIZE // 2


def _setup(config=None):
  """The trainer's own step and initial state for `config` (default: the shared tiny set-up)."""
  config = config or tiny_setup.tiny_config()
  setup = trainer.setup_training(config, tiny_setup.DIGITS_TRAIN_EXAMPLES)
  return setup.forward, train_state.fresh_train_state(setup.forward, setup.optimizer, config.seed, config.data.train_resolution), setup.train_step


def _batch(num_devices, per_device, seed=0):
  rng = np.random.default_rng(seed)
  n = num_devices * per_device
  images = rng.normal(size=(n, RES, RES, 3)).astype(np.float32)
  labels = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, n)]
  return {'images': images.reshape(num_devices, per_device, RES, RES, 3),
          'labels': labels.reshape(num_devices, per_device, NUM_CLASSES)}


def _run(step_fn, state, batches, devices):
  p_step = jax.pmap(step_fn, axis_name=distributed.AXIS_NAME, devices=devices)
  replicated = distributed.replicate(state, distributed.AXIS_NAME, devices)
  for batch in batches:
    replicated, metrics = p_step(replicated, batch)
  return distributed.unreplicate(replicated), jax.tree.map(lambda m: m[0], metrics)


def test_two_devices_match_one_device_with_the_whole_batch():
  assert jax.local_device_count() == 2, 'conftest should simulate 2 CPU devices'
  _, state, step_fn = _setup()
  whole = [_batch(1, 2 * PER_DEVICE, seed=s) for s in range(3)]
  split = [jax.tree.map(lambda x: x.reshape((2, PER_DEVICE) + x.shape[2:]), b) for b in whole]
  one, metrics_one = _run(step_fn, state, whole, jax.local_devices()[:1])
  two, metrics_two = _run(step_fn, state, split, jax.local_devices())
  np.testing.assert_allclose(metrics_one['loss'], metrics_two['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics_one['grad_norm'], metrics_two['grad_norm'], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(two.step) == 3
  # Training moved the classifier and the (zero-initialised) skip gains.
  assert not np.allclose(state.params['NFNet/~/linear']['w'], two.params['NFNet/~/linear']['w'])
  skip_gains = [v['skip_gain'] for v in two.params.values() if 'skip_gain' in v]
  assert skip_gains and all(np.all(g != 0) for g in skip_gains)


def test_a_step_applies_exactly_the_recipe_to_the_gradient_of_the_loss():
  """The step's bookkeeping (finiteness flag, selects, device means, metrics) must not change what it
  computes: the same weights, optimizer state and EMA as the recipe written out directly."""
  config = tiny_setup.tiny_config()
  setup = trainer.setup_training(config, tiny_setup.DIGITS_TRAIN_EXAMPLES)
  _, state, step_fn = _setup(config)
  # From the second step on: the learning rate warms up from 0 at step 0.
  state, _ = _run(step_fn, state, [_batch(1, 2 * PER_DEVICE, seed=3)], jax.local_devices()[:1])
  batch = _batch(1, 2 * PER_DEVICE, seed=4)
  stepped, metrics = _run(step_fn, state, [batch], jax.local_devices()[:1])

  images, labels = batch['images'][0], batch['labels'][0]
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)

  def loss_fn(params):
    logits, _ = setup.forward.apply(params, state.model_state, rng, images, is_training=True)
    return losses.softmax_cross_entropy(logits.astype(jnp.float32), labels,
                                        label_smoothing=config.loss.label_smoothing)

  @jax.jit
  def recipe(params, opt_state, ema_params):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = setup.optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = optim.update_ema(ema_params, params, state.step, config.optimizer.ema_decay)
    return loss, optax.tree.norm(grads), params, opt_state, ema

  loss, grad_norm, params, opt_state, ema = recipe(state.params, state.opt_state, state.ema_params)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['grad_norm'], grad_norm, rtol=1e-5)
  for got, want in ((stepped.params, params), (stepped.opt_state, opt_state), (stepped.ema_params, ema)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert int(stepped.step) == 2 and int(stepped.nonfinite_streak) == 0
  assert float(metrics['learning_rate']) > 0
  assert not np.allclose(jax.tree.leaves(state.params)[0], jax.tree.leaves(params)[0])


def test_metrics_report_lr_agc_and_accuracy():
  _, state, step_fn = _setup()
  _, metrics = _run(step_fn, state, [_batch(2, PER_DEVICE)], jax.local_devices())
  assert set(metrics) >= {'loss', 'top1_acc', 'grad_norm', 'learning_rate', 'agc_clipped_fraction',
                          'finite', 'nonfinite_streak'}
  assert float(metrics['learning_rate']) == 0.0  # step 0 of a linear warmup from 0
  assert 0.0 <= float(metrics['agc_clipped_fraction']) <= 1.0
  assert 0.0 <= float(metrics['top1_acc']) <= 1.0
  assert float(metrics['finite']) == 1.0


def test_nonfinite_batch_skips_the_update_and_counts_it():
  _, state, step_fn = _setup()
  state, _ = _run(step_fn, state, [_batch(2, PER_DEVICE, seed=1)], jax.local_devices())
  bad = _batch(2, PER_DEVICE, seed=2)
  bad['images'][1, 0, 0, 0, 0] = np.nan  # one pixel on one device poisons the averaged gradient
  after, metrics = _run(step_fn, state, [bad, bad], jax.local_devices())
  assert float(metrics['finite']) == 0.0
  assert int(after.nonfinite_streak) == 2
  assert int(after.step) == int(state.step) + 2
  for name in ('params', 'opt_state', 'ema_params'):
    for a, b in zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(after, name))):
      np.testing.assert_array_equal(a, b)
  recovered, metrics = _run(step_fn, after, [_batch(2, PER_DEVICE, seed=3)], jax.local_devices())
  assert int(recovered.nonfinite_streak) == 0 and float(metrics['finite']) == 1.0


def test_bfloat16_compute_keeps_float32_master_weights():
  config = tiny_setup.tiny_config()
  config.precision.compute_dtype = 'bfloat16'
  _, state, step_fn = _setup(config)
  after, metrics = _run(step_fn, state, [_batch(2, PER_DEVICE)], jax.local_devices())
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(after.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(after.opt_state) if hasattr(x, 'dtype')
             and jnp.issubdtype(x.dtype, jnp.floating))
  assert np.isfinite(float(metrics['loss']))


def test_sam_step_takes_its_gradient_function():
  config = tiny_setup.tiny_config()
  config.optimizer.sam_rho = 0.05
  _, state, step_fn = _setup(config)
  batches = [_batch(2, PER_DEVICE), _batch(2, PER_DEVICE, seed=1)]
  after, metrics = _run(step_fn, state, batches, jax.local_devices())
  assert np.isfinite(float(metrics['loss']))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                       jax.tree.leaves(after.params)))


def test_eval_step_counts_only_unmasked_examples():
  forward, state, _ = _setup()
  eval_step = jax.pmap(train_step_lib.make_eval_step(forward), axis_name=distributed.AXIS_NAME)
  batch = _batch(2, tiny_setup.EVAL_BATCH_SIZE // 2)  # the trainer's eval shapes: its compilation is reused
  labels = np.argmax(batch['labels'], -1).astype(np.int32)
  mask = np.ones(labels.shape, np.float32)
  mask[1, 2:] = 0.0
  sums = eval_step(distributed.replicate(train_step_lib.eval_weight_sets(state), distributed.AXIS_NAME),
                   {'images': batch['images'], 'labels': labels, 'mask': mask})
  sums = jax.tree.map(lambda x: float(x[0]), sums)
  assert sums['count'] == mask.sum()
  assert sums['top1'] <= sums['top5'] <= mask.sum()
  # Hits are counted on the unmasked examples alone.
  logits, _ = jax.jit(forward.apply, static_argnames='is_training')(
      state.params, state.model_state, None, batch['images'].reshape(-1, RES, RES, 3), is_training=False)
  expected_top1 = np.sum((np.argmax(logits, -1) == labels.reshape(-1)) * mask.reshape(-1))
  assert sums['top1'] == expected_top1


def test_uint8_batches_are_normalised_in_the_step_exactly_as_on_the_host():
  # The input pipeline sends uint8 training images; the step must see what host normalisation gives.
  pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
  host = ops_image.normalize(pixels)
  np.testing.assert_array_equal(jax.jit(train_step_lib.normalize_images)(pixels), host)
  forward = hk.transform_with_state(
      lambda images, is_training: hk.Linear(NUM_CLASSES)(images.reshape(images.shape[0], -1)))
  optimizer = optax.sgd(0.1)
  state = train_state_lib.init_train_state(forward, optimizer, jax.random.PRNGKey(0), host[0])
  step = train_step_lib.make_train_step(forward, optimizer, lambda step: 0.1,
                                        label_smoothing=0.1, ema_decay=0.99)
  labels = np.eye(NUM_CLASSES, dtype=np.float32)[np.arange(6).reshape(2, 3) % NUM_CLASSES]
  from_uint8, metrics_uint8 = _run(step, state, [{'images': pixels, 'labels': labels}],
                                   jax.local_devices())
  from_float, metrics_float = _run(step, state, [{'images': host, 'labels': labels}],
                                   jax.local_devices())
  assert float(metrics_uint8['loss']) == float(metrics_float['loss'])
  for a, b in zip(jax.tree.leaves(from_uint8.params), jax.tree.leaves(from_float.params)):
    np.testing.assert_array_equal(a, b)


def test_sum_of_squares_sees_every_leaf_and_turns_nonfinite_with_any_of_them():
  tree = {'a': np.full(3, 2.0, np.float32), 'b': np.ones((2, 2), np.float32), 'c': np.float32(3.0)}
  assert float(train_step_lib.sum_of_squares(tree)) == 3 * 4.0 + 4 * 1.0 + 9.0
  assert float(train_step_lib.sum_of_squares({})) == 0.0
  for bad in (np.nan, np.inf, -np.inf):
    for leaf in ('b', 'c'):
      poisoned = dict(tree, **{leaf: np.array(tree[leaf]).copy()})
      poisoned[leaf].reshape(-1)[-1] = bad
      assert not np.isfinite(float(train_step_lib.sum_of_squares(poisoned)))


def test_selecting_many_leaves_on_the_agreed_flag_compiles_to_linear_size():
  """The step selects each of its hundreds of state leaves on one flag computed from a reduction per
  gradient leaf. Without `agreed`, XLA CPU copied those reductions into every select (quadratic program
  size: the F0 step compiled for minutes); the flag must be computed once."""

  def compiled_size(num_leaves):
    leaves = [jax.ShapeDtypeStruct((1, 16, 8), jnp.float32)] * num_leaves

    def select_all(new, old):
      finite = distributed.agreed(jnp.isfinite(train_step_lib.sum_of_squares(new)), 'batch')
      return train_step_lib.select_tree(finite, new, old)

    return len(jax.pmap(select_all, axis_name='batch').lower(leaves, leaves).compile().as_text())

  assert compiled_size(120) < 6 * compiled_size(30)  # 4x the leaves; quadratic growth gave ~14x
