"""Gradient accumulation: one optimizer update from k micro-batches run one after another on each device.

`config.train.batch_size` is the batch of one update, whatever the hardware. Each of the N devices holds
batch_size / N examples of it (the pipeline's device batch, as without accumulation) and runs them as
k = `config.train.accumulation_steps` consecutive micro-batches of batch_size / (k N), summing their float32
gradients inside the compiled step (`jax.lax.scan`). The devices then average once per update, so the
gradient all-reduce costs the same as without accumulation, and everything after it (AGC, weight decay,
momentum, SAM, the EMA, the schedule, the non-finite test) sees the mean gradient of the whole batch.

Micro-batch j of a device is the contiguous run [j m, (j + 1) m) of its device batch (m = the micro-batch
size): the same examples, at the same global stream positions, as an update without accumulation.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from nfnets.errors import ConfigError


class BatchLayout(NamedTuple):
  """How one update's batch is spread over the devices and the micro-batches."""
  num_devices: int
  accumulation_steps: int
  per_device: int     # examples each device holds per update (the leading axis of its batch)
  micro_batch: int    # examples in one forward and backward pass


def batch_layout(train_config: ml_collections.ConfigDict, num_devices: int) -> BatchLayout:
  """The layout of `train_config.batch_size` over `num_devices` devices (all hosts), or a one-line
  `ConfigError` when it does not split."""
  steps = train_config.get('accumulation_steps', 1)
  if not isinstance(steps, int) or steps < 1:
    raise ConfigError(f'config.train.accumulation_steps must be an integer >= 1, got {steps!r}')
  batch_size = train_config.batch_size
  if batch_size <= 0 or batch_size % (steps * num_devices):
    raise ConfigError(
        f'config.train.batch_size {batch_size} does not split into {steps} micro-batches on each of '
        f'{num_devices} devices: it must be a multiple of accumulation_steps x devices = {steps * num_devices}')
  per_device = batch_size // num_devices
  return BatchLayout(num_devices, steps, per_device, per_device // steps)


def per_device_batch_spec(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch one device's train step takes, as shapes: what `jax.pmap` of the step sees per device (add a
  leading device axis of `num_devices` local devices for the pmapped function itself).

  {'images': uint8 [per_device, R, R, 3], 'labels': float32 [per_device, num_classes]}, R the train resolution.
  Lowering the step with these (and the abstract train state) needs no data and allocates nothing.
  """
  layout = batch_layout(config.train, num_devices)
  resolution = config.data.train_resolution
  return {
      'images': jax.ShapeDtypeStruct((layout.per_device, resolution, resolution, 3), jnp.uint8),
      'labels': jax.ShapeDtypeStruct((layout.per_device, config.model.num_classes), jnp.float32),
  }


def micro_batches(batch: Any, accumulation_steps: int) -> Any:
  """A device batch [per_device, ...] as [accumulation_steps, micro_batch, ...], micro-batch j the
  contiguous examples [j micro_batch, (j + 1) micro_batch)."""
  return jax.tree.map(lambda x: x.reshape((accumulation_steps, -1) + x.shape[1:]), batch)


def accumulate(fn: Callable[[Any, jax.Array], tuple[Any, Any]], params: Any, batch: Any, rng: jax.Array,
               accumulation_steps: int) -> tuple[Any, Any]:
  """Runs `fn(micro_batch, rng) -> (grads, aux)` over the micro-batches of `batch`; the gradients are
  shaped like `params`.

  Returns the float32 mean of the gradients and `aux` stacked over the micro-batches (a leading axis of
  `accumulation_steps`). Micro-batch j draws from `fold_in(rng, j)`; with one step `fn` sees `batch` and
  `rng` themselves, so a run without accumulation compiles the step it always did.
  """

  def float32_grads(micro_batch, micro_rng):
    grads, aux = fn(micro_batch, micro_rng)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), aux

  if accumulation_steps == 1:
    grads, aux = float32_grads(batch, rng)
    return grads, jax.tree.map(lambda x: x[None], aux)

  def add_micro_batch(grad_sum, inputs):
    micro_batch, index = inputs
    grads, aux = float32_grads(micro_batch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, grad_sum, grads), aux

  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  grad_sum, aux = jax.lax.scan(add_micro_batch, zeros,
                               (micro_batches(batch, accumulation_steps), jnp.arange(accumulation_steps)))
  return jax.tree.map(lambda g: g / accumulation_steps, grad_sum), aux


def mean_over_micro_batches(tree: Any) -> Any:
  """Stacked per-micro-batch values -> one: floating leaves averaged, others (counters, equal in every
  micro-batch as each starts from the same state) taken from the last."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.floating) else x[-1], tree)
