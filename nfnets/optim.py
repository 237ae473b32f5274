"""The NFNet optimizer recipe as one optax chain, its learning-rate schedule, and the weight EMA.

The paper's update order for each step, all on float32 gradients already averaged across devices:

  1. clip (`clip_mode`): unit-wise AGC (lambda = `agc_lambda`), a global-norm clip (`global_norm_threshold`), or
     none;
  2. coupled weight decay: g += weight_decay * w, on weights only (see `is_decayed`);
  3. SGD with Nesterov momentum: t = g + momentum * t_prev; d = g + momentum * t;
  4. step: w -= lr(step) * d, lr = base_learning_rate * batch_size / reference_batch_size with a linear
     warmup from 0 over `warmup_epochs` then cosine decay to 0 at `total_steps`.

'adamw' (for fine-tuning) replaces 2-4 by optax.adamw with the same schedule and the same decay mask.
With `trainable_module` (fine-tuning with a frozen backbone) the chain sees only that module's parameters;
every other parameter gets an update of exactly zero and keeps no optimiser state.

Sharpness-aware minimisation (`sam_rho > 0`) wraps the chain with optax.contrib.sam in opaque mode (one
ascent step, sync_period 2). The train step must then hand `update` a gradient function:

  grads = pmean(grad(loss)(params, batch))                # as without SAM
  def grad_fn(perturbed_params, adv_step):                # adv_step: int, always 0 here
    return pmean(grad(loss)(perturbed_params, batch))     # same batch and rng; float32; averaged over
                                                          # devices by grad_fn itself
  updates, opt_state = optimizer.update(grads, opt_state, params, grad_fn=grad_fn)

SAM perturbs params by sam_rho * grads / ||grads|| (global norm), calls grad_fn there once, and feeds those
gradients through the chain above with the unperturbed params. Use `needs_grad_fn(config)` to decide whether
to build and pass `grad_fn`; without SAM, `update` takes the usual (grads, state, params).
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfnets import agc
from nfnets import durations
from nfnets import param_paths
from nfnets.errors import ConfigError

_OPTIMIZERS = ('sgd', 'adamw')
_CLIP_MODES = ('agc', 'global_norm', 'none')
_SCHEDULES = ('cosine', 'constant')


def is_decayed(path: param_paths.ParamPath, leaf: jax.Array) -> bool:
  """Weight decay applies to weight matrices and kernels (ndim >= 2) only.

  In every model following the project's conventions the parameters that must not decay (WS gains 'gain',
  biases 'bias'/'b', skip gains 'skip_gain') are vectors or scalars, and every weight ('w' of convs and
  linears, the classifier included) has ndim >= 2, so the rank decides. `path` is unused but kept so that
  the signature matches the other path predicates.
  """
  del path
  return jnp.ndim(leaf) >= 2


def weight_decay_mask(params: Any) -> Any:
  """A tree of bools shaped like `params`: True where weight decay applies (see `is_decayed`)."""
  return param_paths.path_mask(params, is_decayed)


def learning_rate_schedule(optimizer_config: ml_collections.ConfigDict, *, batch_size: int,
                           examples_per_epoch: int, total_steps: int) -> optax.Schedule:
  """lr(step): base_learning_rate * batch_size / reference_batch_size, linear warmup from 0 over
  `warmup_epochs` (converted by `durations.to_steps`), then cosine decay to 0 at `total_steps` ('cosine')
  or held ('constant')."""
  if optimizer_config.schedule not in _SCHEDULES:
    raise ConfigError(f'unknown schedule {optimizer_config.schedule!r}; use one of {_SCHEDULES}')
  if total_steps <= 0:
    raise ConfigError(f'total_steps must be positive, got {total_steps}')
  peak = optimizer_config.base_learning_rate * batch_size / optimizer_config.reference_batch_size
  warmup_steps = durations.to_steps(epochs=optimizer_config.warmup_epochs, batch_size=batch_size,
                                    examples_per_epoch=examples_per_epoch, name='optimizer.warmup_epochs')
  if warmup_steps >= total_steps:
    raise ConfigError(f'warmup ({warmup_steps} steps) must be shorter than training ({total_steps} steps); '
                     'lower optimizer.warmup_epochs or train longer')
  if optimizer_config.schedule == 'constant':
    after_warmup = optax.constant_schedule(peak)
  else:
    after_warmup = optax.cosine_decay_schedule(peak, decay_steps=total_steps - warmup_steps, alpha=0.0)
  if warmup_steps == 0:
    return after_warmup
  warmup = optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)
  return optax.join_schedules([warmup, after_warmup], boundaries=[warmup_steps])


def clipping_transform(optimizer_config: ml_collections.ConfigDict,
                       classifier_module: Optional[str] = None) -> optax.GradientTransformation:
  """The first link of the chain, per `clip_mode`.

  AGC leaves the final classifier's weight unclipped: the module the model registry names, or by default the
  top-level 'linear' (see `param_paths.is_final_classifier_weight`).
  """
  if 'clipping' in optimizer_config:  # the old field, which meant either, set by a config written in Python
    raise ConfigError('optimizer.clipping was renamed: use optimizer.agc_lambda (clip_mode agc) or '
                      'optimizer.global_norm_threshold (clip_mode global_norm)')
  mode = optimizer_config.clip_mode
  if mode == 'agc':
    exclude = param_paths.is_final_classifier_weight
    if classifier_module is not None:
      exclude = lambda path: path == (classifier_module, 'w')
    return agc.adaptive_grad_clip(optimizer_config.agc_lambda, eps=optimizer_config.agc_eps, exclude=exclude)
  if mode == 'global_norm':
    threshold = optimizer_config.global_norm_threshold
    if not threshold > 0:
      raise ConfigError(f'optimizer.global_norm_threshold must be > 0, got {threshold}')
    return optax.clip_by_global_norm(threshold)
  if mode == 'none':
    return optax.identity()
  raise ConfigError(f'unknown clip_mode {mode!r}; use one of {_CLIP_MODES}')


def _normalize_globally() -> optax.GradientTransformation:
  """g / ||g|| over the whole tree; the floor keeps an all-zero gradient from producing NaNs."""

  def update_fn(updates, state, params=None):
    del params
    norm = jnp.maximum(optax.tree.norm(updates), 1e-12)
    return jax.tree.map(lambda g: g / norm, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def only_module(optimizer: optax.GradientTransformation, module: str) -> optax.GradientTransformationExtraArgs:
  """`optimizer` applied to the parameters of Haiku module `module` alone; all others get zero updates.

  Zero updates leave a weight bitwise unchanged (w + 0 == w), and the frozen weights hold no optimiser
  state, so a frozen backbone costs no momentum or Adam memory.
  """

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'trained' if param_paths.param_path(path)[0] == module else 'frozen', params)

  return optax.multi_transform({'trained': optimizer, 'frozen': optax.set_to_zero()}, labels)


def build_optimizer(optimizer_config: ml_collections.ConfigDict, *, batch_size: int, examples_per_epoch: int,
                    total_steps: int, classifier_module: Optional[str] = None,
                    trainable_module: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
  """The paper's chain (see the module docstring), every number from `optimizer_config` (config.optimizer).

  Args:
    optimizer_config: name, base_learning_rate, reference_batch_size, warmup_epochs, schedule, momentum,
      nesterov, weight_decay, clip_mode, agc_lambda, agc_eps, global_norm_threshold, sam_rho, adam_b1, adam_b2.
    batch_size: global batch size (all devices, all hosts), for the learning-rate scaling.
    examples_per_epoch: the training split's size, for the warmup length.
    total_steps: optimizer steps in the whole run; the cosine reaches 0 there.
    classifier_module: the model's final classifier (from the model registry), whose weight AGC leaves alone.
    trainable_module: None trains every parameter; a Haiku module name (the classifier, for fine-tuning
      with a frozen backbone) trains that module's parameters only (see `only_module`).

  Returns:
    The optimizer. With sam_rho > 0 its update needs `grad_fn=` (see `needs_grad_fn`).
  """
  if optimizer_config.name not in _OPTIMIZERS:
    raise ConfigError(f'unknown optimizer {optimizer_config.name!r}; use one of {_OPTIMIZERS}')
  if optimizer_config.weight_decay < 0:
    raise ConfigError(f'weight_decay must be >= 0, got {optimizer_config.weight_decay}')
  if optimizer_config.sam_rho < 0:
    raise ConfigError(f'sam_rho must be >= 0 (0 turns SAM off), got {optimizer_config.sam_rho}')
  schedule = learning_rate_schedule(optimizer_config, batch_size=batch_size,
                                    examples_per_epoch=examples_per_epoch, total_steps=total_steps)
  clip = clipping_transform(optimizer_config, classifier_module)
  if optimizer_config.name == 'sgd':
    momentum = optimizer_config.momentum or None
    chain = optax.chain(
        clip,
        optax.add_decayed_weights(optimizer_config.weight_decay, mask=weight_decay_mask),
        optax.sgd(schedule, momentum=momentum, nesterov=bool(optimizer_config.nesterov) and momentum is not None),
    )
  else:
    chain = optax.chain(
        clip,
        optax.adamw(schedule, b1=optimizer_config.adam_b1, b2=optimizer_config.adam_b2,
                    weight_decay=optimizer_config.weight_decay, mask=weight_decay_mask),
    )
  if trainable_module is not None:
    chain = only_module(chain, trainable_module)
  if not needs_grad_fn(optimizer_config):
    return chain
  ascent = optax.chain(_normalize_globally(), optax.sgd(optimizer_config.sam_rho))
  return optax.contrib.sam(chain, ascent, sync_period=2, opaque_mode=True)


def needs_grad_fn(optimizer_config: ml_collections.ConfigDict) -> bool:
  """True when the optimizer is SAM-wrapped and `update` must be called with `grad_fn=`."""
  return optimizer_config.sam_rho > 0


def ema_decay_at(step: Any, decay: float) -> jax.Array:
  """The EMA decay used at optimizer step `step` (0 for the first): min(decay, (1 + step) / (10 + step)).

  The ramp keeps early averages from being dominated by the random initialisation.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def update_ema(ema_params: Any, params: Any, step: Any, decay: float) -> Any:
  """ema <- d * ema + (1 - d) * params with d = ema_decay_at(step, decay), in float32.

  `step` is the number of updates applied before this one (the step counter before incrementing).
  Computed as ema + (1 - d) * (params - ema): the same average, but a weight equal to its average (a frozen
  one) stays bitwise equal; d * w + (1 - d) * w rounds away from w for a few percent of float32 values.
  Leaves that are not floating point (e.g. the update counters in batch normalisation's moving-average
  state) are counts, not estimates: they take the new value, keeping their dtype.
  """
  d = ema_decay_at(step, decay)

  def update(e, p):
    if not jnp.issubdtype(p.dtype, jnp.floating):
      return p
    e = e.astype(jnp.float32)
    return e + (1.0 - d) * (p.astype(jnp.float32) - e)

  return jax.tree.map(update, ema_params, params)
