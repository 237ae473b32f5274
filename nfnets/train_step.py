"""The pure per-device training and evaluation steps.

`train_step(state, batch) -> (state, metrics)` knows nothing of pmap beyond the name of the device axis
its collectives reduce over, so the caller may run it under `jax.pmap` (what `trainer.py` does) or move it
to `jax.shard_map` unchanged. One step is one optimizer update: it may run its device batch as several
micro-batches (`nfnets.accumulation`) and, for float16 compute, scale the loss dynamically; an update it
skips is counted in the state by cause (docs/accumulation_and_float16.md).
"""
from typing import Any, Callable, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import optax

from nfnets import accumulation
from nfnets import agc
from nfnets import distributed
from nfnets import losses
from nfnets import optim
from nfnets.data import ops_image
from nfnets.train_state import TrainState

Metrics = dict[str, jax.Array]


def normalize_images(images: jax.Array) -> jax.Array:
  """Pixels on the 0-255 scale -> float32 (x - mean) / std, the same float32 operations as `ops_image.normalize`.

  Batches carry pixels, never normalised images: training batches as uint8 (a quarter of the bytes of float32
  to copy to the device), evaluation batches as float32, because the reference's evaluation resize keeps its
  fractional, unclipped values (docs/data.md).
  """
  if images.dtype not in (jnp.uint8, jnp.float32):
    raise TypeError(f'images must be uint8 or float32 pixels on the 0-255 scale, got {images.dtype}')
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


def select_tree(keep_new: jax.Array, new, old):
  """`new` where the scalar `keep_new` holds, else `old`, leaf by leaf.

  Each select fuses into the computation of its new leaf, so choosing costs no pass over the weights
  (a `lax.cond` between the two states copied every leaf it returned).
  """
  return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def make_train_step(forward: hk.TransformedWithState,
                    optimizer: optax.GradientTransformation,
                    learning_rate_fn: optax.Schedule,
                    *,
                    label_smoothing: float,
                    ema_decay: float,
                    uses_grad_fn: bool = False,
                    accumulation_steps: int = 1,
                    loss_scale_period: Optional[int] = None,
                    axis_name: str = distributed.AXIS_NAME) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
  """Builds the per-device step.

  Args:
    forward: the model (`models.make_forward`), computing in its policy's dtype with float32 logits.
    optimizer: the optax chain from `optim.build_optimizer`.
    learning_rate_fn: the schedule inside `optimizer`, only to report the learning rate.
    label_smoothing: applied to the (already mixed) targets.
    ema_decay: the EMA's ceiling; see `optim.update_ema`.
    uses_grad_fn: the optimizer's update takes `grad_fn` (SAM): a function from parameters to the
      device-averaged gradient on this step's batch (its micro-batches, accumulated the same way).
    accumulation_steps: the device batch is this many consecutive micro-batches, whose float32 gradients
      are averaged before the one cross-device mean of the update (see `nfnets.accumulation`).
    loss_scale_period: None, or dynamic loss scaling (float16 compute): the loss is multiplied by
      `state.loss_scale`, gradients are unscaled before the optimizer, an update whose gradients overflow
      is skipped and halves the scale, and `loss_scale_period` good updates in a row double it.
    axis_name: the device axis the gradients and metrics are averaged over.
  """
  loss_scaling = loss_scale_period is not None

  def loss_fn(params, model_state, rng, batch, loss_scale):
    images = normalize_images(batch['images'])
    logits, model_state = forward.apply(params, model_state, rng, images, is_training=True)
    logits = logits.astype(jnp.float32)
    loss = losses.softmax_cross_entropy(logits, batch['labels'], label_smoothing=label_smoothing)
    target_class = jnp.argmax(batch['labels'], axis=-1)
    top1 = jnp.mean((jnp.argmax(logits, axis=-1) == target_class).astype(jnp.float32))
    scaled = loss if loss_scale is None else loss_scale.scale(loss)
    return scaled, (loss, top1, model_state)

  def averaged_grads(params, model_state, rng, batch, loss_scale):
    """The update's gradient (unscaled) and loss, averaged over the micro-batches and the devices, and
    this device's top-1 and new model state, averaged over its micro-batches."""

    def micro_batch_grads(micro_batch, micro_rng):
      return jax.grad(loss_fn, has_aux=True)(params, model_state, micro_rng, micro_batch, loss_scale)

    # Accumulated and reduced in float32 whatever the compute dtype was, so the all-reduce loses nothing.
    grads, per_micro_batch = accumulation.accumulate(micro_batch_grads, params, batch, rng, accumulation_steps)
    loss, top1, model_state = accumulation.mean_over_micro_batches(per_micro_batch)
    grads, loss = distributed.device_mean(grads, axis_name), distributed.device_mean(loss, axis_name)
    if loss_scale is not None:
      grads = loss_scale.unscale(grads)
    return grads, loss, top1, model_state

  def train_step(state: TrainState, batch) -> tuple[TrainState, Metrics]:
    if batch['images'].dtype != jnp.uint8:
      raise TypeError(f'training images must be uint8 pixels, as the input pipeline makes them (the step '
                      f'normalises them); got {batch["images"].dtype}')
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(axis_name))
    loss_scale = None
    if loss_scaling:
      loss_scale = jmp.DynamicLossScale(state.loss_scale, state.loss_scale_counter, period=loss_scale_period)
    grads, loss, top1, model_state = averaged_grads(state.params, state.model_state, rng, batch, loss_scale)

    # Every device sees the same averaged loss and gradients, so all of them take the same decision. A
    # finite sum of squared gradients also bounds every gradient below ~1e19, so with any sane learning rate
    # the new weights are finite too and need no check of their own.
    grad_sum_of_squares = sum_of_squares(grads)
    loss_finite = jnp.isfinite(loss)
    finite = loss_finite & jnp.isfinite(grad_sum_of_squares)

    extra_args = {}
    if uses_grad_fn:
      extra_args['grad_fn'] = lambda p, _: averaged_grads(p, state.model_state, rng, batch, loss_scale)[0]
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra_args)
    if uses_grad_fn:  # the update comes from a second gradient, at perturbed weights: check it too
      finite &= jnp.isfinite(sum_of_squares(updates))
    params = optax.apply_updates(state.params, updates)
    # Keep the replicas' state identical. Batch statistics averaged across devices already are; counters
    # (integers, equal on every device) are left alone, as pmean would turn them into floats.
    model_state = jax.tree.map(
        lambda x: distributed.device_mean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, model_state)
    ema_params = optim.update_ema(state.ema_params, params, state.step, ema_decay)
    ema_model_state = optim.update_ema(state.ema_model_state, model_state, state.step, ema_decay)
    # A skipped step changes nothing but the counters (and the loss scale).
    finite = distributed.agreed(finite, axis_name)
    params, model_state, opt_state, ema_params, ema_model_state = select_tree(
        finite, (params, model_state, opt_state, ema_params, ema_model_state),
        (state.params, state.model_state, state.opt_state, state.ema_params, state.ema_model_state))
    skip = classify_skip(finite, loss_finite, state, loss_scale)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        ema_params=ema_params,
        ema_model_state=ema_model_state,
        rng=state.rng,
        # An overflow neither extends nor ends a run of non-finite updates.
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + skip.nonfinite).astype(jnp.int32),
        loss_scale=skip.loss_scale,
        loss_scale_counter=skip.loss_scale_counter,
        skipped_overflow=state.skipped_overflow + skip.overflow,
        skipped_nonfinite=state.skipped_nonfinite + skip.nonfinite,
    )

    metrics = {
        'loss': loss,
        'top1_acc': distributed.device_mean(top1, axis_name),
        'grad_norm': jnp.sqrt(grad_sum_of_squares),
        'learning_rate': learning_rate_fn(state.step),
        'finite': finite.astype(jnp.float32),
        'nonfinite_streak': new_state.nonfinite_streak,
        'skipped_overflow': new_state.skipped_overflow,
        'skipped_nonfinite': new_state.skipped_nonfinite,
    }
    if loss_scaling:
      metrics['overflow'] = skip.overflow.astype(jnp.float32)
      metrics['loss_scale'] = state.loss_scale  # the scale this step used
    clipped = agc.clipped_fraction(opt_state)
    if clipped is not None:
      metrics['agc_clipped_fraction'] = clipped
    return new_state, metrics

  return train_step


class Skip(NamedTuple):
  overflow: jax.Array            # int32 0/1: skipped for a float16 overflow under loss scaling
  nonfinite: jax.Array           # int32 0/1: skipped for a non-finite loss or gradient
  loss_scale: jax.Array          # the next step's loss scale and counter
  loss_scale_counter: jax.Array


def classify_skip(finite: jax.Array, loss_finite: jax.Array, state: TrainState,
                  loss_scale: Optional[jmp.DynamicLossScale]) -> Skip:
  """Why an update was skipped (if it was), and the loss scale that follows.

  Under loss scaling, a finite loss with non-finite gradients is an overflow of the scaled float16
  backward pass while the scale is above 1: the scale halves and the step is not counted as non-finite.
  At a scale of 1 nothing was scaled, and a non-finite loss is no overflow of the gradients: both are
  non-finite updates, which leave the scale alone and count towards `max_consecutive_nonfinite`, so a
  diverged run still stops (after at most log2(scale) overflows halve the scale to 1).
  """
  if loss_scale is None:
    return Skip(jnp.zeros([], jnp.int32), (~finite).astype(jnp.int32), state.loss_scale,
                state.loss_scale_counter)
  overflow = ~finite & loss_finite & (state.loss_scale > 1)
  nonfinite = ~finite & ~overflow
  adjusted = loss_scale.adjust(finite)
  new_scale, new_counter = select_tree(nonfinite, (state.loss_scale, state.loss_scale_counter),
                                       (adjusted.loss_scale, adjusted.counter))
  return Skip(overflow.astype(jnp.int32), nonfinite.astype(jnp.int32), new_scale,
              new_counter.astype(jnp.int32))


def make_eval_step(forward: hk.TransformedWithState,
                   axis_name: str = distributed.AXIS_NAME) -> Callable[[dict, Any], Metrics]:
  """Per-device eval over several weight sets at once (e.g. raw and EMA), reading each batch once.

  `eval_step(weight_sets, batch)` takes `{prefix: (params, model_state)}` and a batch of pixels (uint8 or
  float32, normalised here as the train step normalises) and returns, summed over the devices, the unmasked
  example count and `{prefix}top1` / `{prefix}top5` hit counts.
  """

  def hits(params, model_state, batch):
    logits, _ = forward.apply(params, model_state, None, normalize_images(batch['images']), is_training=False)
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
