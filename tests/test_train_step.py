"""The pure train/eval steps under pmap on 2 simulated CPU devices."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets import distributed
from nfnets import evaluate
from nfnets import losses
from nfnets import optim
from nfnets import train_state as train_state_lib
from nfnets import train_state
from nfnets import train_step as train_step_lib
from nfnets import trainer
from nfnets.data import digits
from nfnets.data import ops_image
from nfnets.data import pipeline
from nfnets.data import sources
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
  images = rng.integers(0, 256, size=(n, RES, RES, 3), dtype=np.uint8)  # pixels, as the pipeline sends them
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

  images, labels = ops_image.normalize(batch['images'][0]), batch['labels'][0]
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
  bad['labels'][1, 0, 0] = np.nan  # one target on one device poisons the averaged gradient
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


def test_sam_step_updates_with_the_gradient_at_the_ascended_weights():
  """SAM (Foret et al. 2021): with g the gradient at the weights w, the update is the base optimizer's update
  (clipping, decay, momentum), at w, of the gradient at w + rho * g / ||g|| (global norm) on the same batch;
  both gradients are means over the devices. Written out here, on one device with the whole batch (the NFNet
  keeps no batch statistics and dropout and stochastic depth are off, so its loss is the devices' mean)."""
  rho = 0.05
  config = tiny_setup.tiny_config()
  config.optimizer.sam_rho = rho
  setup = trainer.setup_training(config, tiny_setup.DIGITS_TRAIN_EXAMPLES)
  plain_config = tiny_setup.tiny_config()
  plain_config.optimizer.sam_rho = 0.0
  base_optimizer = trainer.setup_training(plain_config, tiny_setup.DIGITS_TRAIN_EXAMPLES).optimizer
  state = train_state.fresh_train_state(setup.forward, setup.optimizer, config.seed, RES)
  # From the second step on: the learning rate warms up from 0 at step 0, and the momentum is non-zero.
  state, _ = _run(setup.train_step, state, [_batch(2, PER_DEVICE, seed=0)], jax.local_devices())
  batch = _batch(2, PER_DEVICE, seed=1)
  stepped, _ = _run(setup.train_step, state, [batch], jax.local_devices())

  images = train_step_lib.normalize_images(batch['images'].reshape(-1, RES, RES, 3))  # as the step does on device
  labels = batch['labels'].reshape(-1, NUM_CLASSES)

  def loss_fn(params):
    logits, _ = setup.forward.apply(params, state.model_state, jax.random.PRNGKey(0), images, is_training=True)
    return losses.softmax_cross_entropy(logits.astype(jnp.float32), labels,
                                        label_smoothing=config.loss.label_smoothing)

  grad_fn = jax.jit(jax.grad(loss_fn))  # one compiled gradient, taken at w and at the ascended weights

  @jax.jit
  def ascend(params, grads):
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda w, g: w + rho * g / norm, params, grads)

  @jax.jit
  def base_update(grads, ascended_grads, base_state, params):
    updates, sam_state = base_optimizer.update(ascended_grads, base_state, params)
    _, plain_state = base_optimizer.update(grads, base_state, params)
    return optax.apply_updates(params, updates), sam_state, plain_state

  base_state = state.opt_state.opt_state  # optax.contrib.sam's state holds the base optimizer's
  grads = grad_fn(state.params)
  params, sam_state, plain_state = base_update(grads, grad_fn(ascend(state.params, grads)), base_state,
                                               state.params)
  got_state = stepped.opt_state.opt_state
  assert jax.tree.structure(got_state) == jax.tree.structure(sam_state)
  # The momentum holds this step's processed gradient exactly; the weights add it, scaled, to themselves.
  for got, want in ((got_state, sam_state), (stepped.params, params)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
  # Measured: the step's momentum is 8e-8 (relative norm) from the formula's, plain SGD's 2.5e-2: the test sees
  # the ascent (a flipped rho or a missing normalisation fails it).
  difference = lambda x, y: float(optax.tree.norm(jax.tree.map(jnp.subtract, x, y)) / optax.tree.norm(y))
  assert difference(got_state, sam_state) < 1e-6 and difference(plain_state, sam_state) > 1e-2, (
      difference(got_state, sam_state), difference(plain_state, sam_state))


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
      state.params, state.model_state, None, ops_image.normalize(batch['images'].reshape(-1, RES, RES, 3)),
      is_training=False)
  expected_top1 = np.sum((np.argmax(logits, -1) == labels.reshape(-1)) * mask.reshape(-1))
  assert sums['top1'] == expected_top1


def test_uint8_batches_are_normalised_in_the_step_exactly_as_on_the_host():
  # The input pipeline sends uint8 training images; the step must see what host normalisation gives.
  pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
  host = ops_image.normalize(pixels)
  np.testing.assert_array_equal(jax.jit(train_step_lib.normalize_images)(pixels), host)
  # Evaluation's float32 pixels (fractional, overshooting [0, 255]) likewise.
  fractional = np.random.default_rng(1).uniform(-20, 275, (2, 3, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(jax.jit(train_step_lib.normalize_images)(fractional),
                                ops_image.normalize(fractional))
  forward = hk.transform_with_state(
      lambda images, is_training: hk.Linear(NUM_CLASSES)(images.reshape(images.shape[0], -1)))
  optimizer = optax.sgd(0.1)
  state = train_state_lib.init_train_state(forward, optimizer, jax.random.PRNGKey(0), host[0])
  step = train_step_lib.make_train_step(forward, optimizer, lambda step: 0.1,
                                        label_smoothing=0.1, ema_decay=0.99)
  labels = np.eye(NUM_CLASSES, dtype=np.float32)[np.arange(6).reshape(2, 3) % NUM_CLASSES]
  from_uint8, metrics_uint8 = _run(step, state, [{'images': pixels, 'labels': labels}],
                                   jax.local_devices())
  # The same step on host-normalised images, computed as the step did before it required pixels.
  grads = jax.grad(lambda p: losses.softmax_cross_entropy(
      forward.apply(p, {}, None, host.reshape(6, 8, 8, 3), is_training=True)[0], labels.reshape(6, -1),
      label_smoothing=0.1))(state.params)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
  for a, b in zip(jax.tree.leaves(from_uint8.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert np.isfinite(float(metrics_uint8['loss']))


def test_the_train_step_refuses_images_that_are_not_uint8_pixels():
  _, state, step_fn = _setup()
  batch = _batch(2, PER_DEVICE)
  batch['images'] = ops_image.normalize(batch['images'])  # already normalised: it would be normalised twice
  with pytest.raises(TypeError, match='training images must be uint8 pixels.*got float32'):
    _run(step_fn, state, [batch], jax.local_devices())
  with pytest.raises(TypeError, match='uint8 or float32 pixels'):
    train_step_lib.normalize_images(jnp.zeros((1, 2, 2, 3), jnp.int32))


def test_evaluation_of_device_normalised_pixels_equals_the_host_normalised_path_bitwise(tmp_path):
  """The eval pipeline sends pixels that the eval step normalises: logits and accuracies must be exactly those
  of the former path, images normalised on the host (`ops_image.eval_image`) and fed to the model as they are."""
  config = tiny_setup.tiny_config()
  config.data.data_dir = digits.prepare(str(tmp_path))
  forward, state, _ = _setup()
  # Random weights everywhere (a fresh NFNet's classifier is zero: every logit would be 0).
  noise = iter(np.random.default_rng(0).normal(size=10 ** 6).astype(np.float32))
  params = jax.tree.map(lambda p: p + 0.2 * np.fromiter(noise, np.float32, p.size).reshape(p.shape), state.params)
  weight_sets = {'': (params, state.model_state)}
  batches = list(pipeline.make_eval_iterator(config.data, global_batch_size=tiny_setup.EVAL_BATCH_SIZE))
  source = sources.get_source(config.data, config.data.eval_split)

  apply = jax.pmap(lambda images: forward.apply(params, state.model_state, None, images, is_training=False)[0])
  on_device = jax.pmap(lambda pixels: forward.apply(
      params, state.model_state, None, train_step_lib.normalize_images(pixels), is_training=False)[0])
  old_logits, new_logits = [], []
  for batch in batches:
    old_logits.append(apply(ops_image.normalize(batch['images'])).reshape(-1, NUM_CLASSES))
    new_logits.append(on_device(batch['images']).reshape(-1, NUM_CLASSES))
  real = np.concatenate([b['mask'].reshape(-1) for b in batches]) == 1
  old_logits, new_logits = np.concatenate(old_logits)[real], np.concatenate(new_logits)[real]
  # The former batches: every real image through the host's eval_image, exactly.
  first = ops_image.eval_image(source[0]['image'], config.data.eval_resolution, config.data.eval_resize_margin)
  np.testing.assert_array_equal(ops_image.normalize(batches[0]['images'][0, 0]), first)
  np.testing.assert_array_equal(new_logits, old_logits)
  assert len(np.unique(np.argmax(old_logits, -1))) > 1  # the weights tell the images apart

  labels = np.array([source[i]['label'] for i in range(len(source))])
  old_top1 = np.sum(np.argmax(old_logits, -1) == labels) / len(source)
  old_top5 = np.sum(np.asarray(losses.topk_correct(old_logits, labels, 5))) / len(source)
  results = evaluate.evaluate(trainer.pmap_eval_step(config),
                              distributed.replicate(weight_sets, distributed.AXIS_NAME), batches)
  assert results == {'top1': old_top1, 'top5': old_top5, 'num_examples': len(source)}


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
