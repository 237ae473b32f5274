"""The pure per-device training and evaluation steps.

`train_step(state, batch) -> (state, metrics)` knows nothing of pmap beyond the name of the device axis
its collectives reduce over, so the caller may run it under `jax.pmap` (what `trainer.py` does) or move it
to `jax.shard_map` unchanged.
"""
from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from nfnets import agc
from nfnets import losses
from nfnets import optim
from nfnets.data import ops_image

AXIS_NAME = 'batch'
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
  step: jax.Array               # int32 scalar: updates applied or skipped so far
  params: hk.Params             # float32 master weights
  model_state: hk.State         # empty for NFNets; batch statistics for normalised baselines
  opt_state: optax.OptState
  ema_params: hk.Params
  ema_model_state: hk.State
  rng: jax.Array                # base key; per-step, per-device keys are folded from it
  nonfinite_streak: jax.Array   # int32: consecutive updates skipped for a non-finite loss or gradient


def init_train_state(forward: hk.TransformedWithState, optimizer: optax.GradientTransformation,
                     rng: jax.Array, sample_images: jax.Array) -> TrainState:
  """A fresh state; `sample_images` only fixes shapes (one example is enough)."""
  init_rng, step_rng = jax.random.split(rng)
  params, model_state = forward.init(init_rng, sample_images, is_training=True)
  return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      model_state=model_state,
      opt_state=optimizer.init(params),
      ema_params=params,
      ema_model_state=model_state,
      rng=step_rng,
      nonfinite_streak=jnp.zeros([], jnp.int32),
  )


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 (x - mean) / std, the same float32 operations as `ops_image.normalize`.

  Training batches arrive as uint8 (a quarter of the bytes of float32 to copy to the device);
  anything else is taken as already normalised.
  """
  if images.dtype != jnp.uint8:
    return images
  mean = jnp.asarray(ops_image.MEAN_RGB, jnp.float32)
  inv_stddev = jnp.asarray(ops_image.INV_STDDEV_RGB, jnp.float32)
  return (images.astype(jnp.float32) - mean) * inv_stddev


def sum_of_squares(tree) -> jax.Array:
  """The float32 sum of the squares of every element of `tree` (0 for an empty tree).

  It is non-finite when any element is, so the same reductions (one per leaf) give both the gradient
  norm and the finiteness test; it also fails for gradients so large (above ~1e19) that their squares
  overflow, which no usable update has.
  """
  per_leaf = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
  if not per_leaf:
    return jnp.zeros([], jnp.float32)
  return jnp.sum(jnp.stack(per_leaf))


def agreed(flag: jax.Array, axis_name: str) -> jax.Array:
  """`flag` held on every device of `axis_name` (a boolean scalar).

  The devices already agree when the flag comes from averaged values. The collective matters to the
  compiler: its result is one materialised scalar, where XLA CPU otherwise copied the hundreds of
  per-leaf reductions computing the flag into the fusion of every select consuming it (a program
  quadratic in the number of leaves: the F0 step compiled in minutes).
  """
  return jax.lax.pmin(flag.astype(jnp.int32), axis_name) > 0


def select_tree(keep_new: jax.Array, new, old):
  """`new` where the scalar `keep_new` holds, else `old`, leaf by leaf.

  Each select fuses into the computation of its new leaf, so choosing costs no pass over the weights
  (a `lax.cond` between the two states copied every leaf it returned).
  """
  return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def device_mean(tree, axis_name: str):
  """`pmean` over `axis_name`, skipped on an axis of one device (XLA would still copy every leaf)."""
  if jax.lax.axis_size(axis_name) == 1:
    return tree
  return jax.lax.pmean(tree, axis_name)


def make_train_step(forward: hk.TransformedWithState,
                    optimizer: optax.GradientTransformation,
                    learning_rate_fn: optax.Schedule,
                    *,
                    label_smoothing: float,
                    ema_decay: float,
                    uses_grad_fn: bool = False,
                    axis_name: str = AXIS_NAME) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
  """Builds the per-device step.

  Args:
    forward: the model (`models.make_forward`), computing in its policy's dtype with float32 logits.
    optimizer: the optax chain from `optim.build_optimizer`.
    learning_rate_fn: the schedule inside `optimizer`, only to report the learning rate.
    label_smoothing: applied to the (already mixed) targets.
    ema_decay: the EMA's ceiling; see `optim.update_ema`.
    uses_grad_fn: the optimizer's update takes `grad_fn` (SAM): a function from parameters to the
      device-averaged gradient on this step's batch.
    axis_name: the device axis the gradients and metrics are averaged over.
  """

  def loss_fn(params, model_state, rng, batch):
    images = normalize_images(batch['images'])
    logits, model_state = forward.apply(params, model_state, rng, images, is_training=True)
    logits = logits.astype(jnp.float32)
    loss = losses.softmax_cross_entropy(logits, batch['labels'], label_smoothing=label_smoothing)
    return loss, (logits, model_state)

  def averaged_grads(params, model_state, rng, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, rng, batch)
    # Reduce in float32 whatever the compute dtype was, so the all-reduce loses nothing.
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    return device_mean(grads, axis_name), device_mean(loss, axis_name), aux

  def train_step(state: TrainState, batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(axis_name))
    grads, loss, (logits, model_state) = averaged_grads(state.params, state.model_state, rng, batch)

    # Every device sees the same averaged loss and gradients, so all of them take the same decision. A
    # finite sum of squared gradients also bounds every gradient below ~1e19, so with any sane learning rate
    # the new weights are finite too and need no check of their own.
    grad_sum_of_squares = sum_of_squares(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_sum_of_squares)

    extra_args = {}
    if uses_grad_fn:
      extra_args['grad_fn'] = lambda p, _: averaged_grads(p, state.model_state, rng, batch)[0]
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra_args)
    if uses_grad_fn:  # the update comes from a second gradient, at perturbed weights: check it too
      finite &= jnp.isfinite(sum_of_squares(updates))
    params = optax.apply_updates(state.params, updates)
    # Keep the replicas' state identical. Batch statistics averaged across devices already are; counters
    # (integers, equal on every device) are left alone, as pmean would turn them into floats.
    model_state = jax.tree.map(
        lambda x: device_mean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, model_state)
    ema_params = optim.update_ema(state.ema_params, params, state.step, ema_decay)
    ema_model_state = optim.update_ema(state.ema_model_state, model_state, state.step, ema_decay)
    # A non-finite step changes nothing but the counters.
    finite = agreed(finite, axis_name)
    params, model_state, opt_state, ema_params, ema_model_state = select_tree(
        finite, (params, model_state, opt_state, ema_params, ema_model_state),
        (state.params, state.model_state, state.opt_state, state.ema_params, state.ema_model_state))
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        ema_params=ema_params,
        ema_model_state=ema_model_state,
        rng=state.rng,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32),
    )

    target_class = jnp.argmax(batch['labels'], axis=-1)
    top1 = jnp.mean((jnp.argmax(logits, axis=-1) == target_class).astype(jnp.float32))
    metrics = {
        'loss': loss,
        'top1_acc': device_mean(top1, axis_name),
        'grad_norm': jnp.sqrt(grad_sum_of_squares),
        'learning_rate': learning_rate_fn(state.step),
        'finite': finite.astype(jnp.float32),
        'nonfinite_streak': new_state.nonfinite_streak,
    }
    clipped = agc.clipped_fraction(opt_state)
    if clipped is not None:
      metrics['agc_clipped_fraction'] = clipped
    return new_state, metrics

  return train_step


def make_eval_step(forward: hk.TransformedWithState,
                   axis_name: str = AXIS_NAME) -> Callable[[dict, Any], Metrics]:
  """Per-device eval over several weight sets at once (e.g. raw and EMA), reading each batch once.

  `eval_step(weight_sets, batch)` takes `{prefix: (params, model_state)}` and returns, summed over the
  devices, the unmasked example count and `{prefix}top1` / `{prefix}top5` hit counts.
  """

  def hits(params, model_state, batch):
    logits, _ = forward.apply(params, model_state, None, batch['images'], is_training=False)
    mask = batch['mask']
    return {
        'top1': jnp.sum(mask * losses.topk_correct(logits, batch['labels'], 1)),
        'top5': jnp.sum(mask * losses.topk_correct(logits, batch['labels'], 5)),
    }

  def eval_step(weight_sets: dict, batch) -> Metrics:
    sums = {'count': jnp.sum(batch['mask'])}
    for prefix, (params, model_state) in weight_sets.items():
      sums.update({prefix + k: v for k, v in hits(params, model_state, batch).items()})
    return jax.lax.psum(sums, axis_name)

  return eval_step


def eval_weight_sets(state: TrainState) -> dict:
  """The weights a training run reports: raw and EMA."""
  return {'': (state.params, state.model_state), 'ema_': (state.ema_params, state.ema_model_state)}
