"""Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, section 4) as an optax transformation.

For each unit i of each parameter, if ||G_i|| / max(||W_i||, eps) > clipping, the gradient is rescaled to
G_i * clipping * max(||W_i||, eps) / ||G_i||. The arithmetic is `optax.adaptive_grad_clip`'s; this module adds
what the NFNet recipe needs around it:

* explicit unit axes per leaf (see `unit_axes`), so that degenerate shapes such as a (1, O) linear or a
  (1, 1, 1, O) kernel are still clipped per output unit (optax's default squeezes those into one unit);
* float32 norms when gradients arrive in bfloat16/float16 (the clipped gradient keeps its dtype);
* the final classifier weight left unclipped via `optax.masked` (`param_paths.is_final_classifier_weight`);
* the fraction of clipped units, kept in the state and read back with `clipped_fraction(opt_state)`.

Leaves are named by their (module_name, param_name) path (`nfnets.param_paths`).
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from nfnets import param_paths
from nfnets.errors import ConfigError

ExcludeFn = Callable[[param_paths.ParamPath], bool]


def unit_axes(ndim: int) -> Optional[tuple[int, ...]]:
  """Axes reduced to form one unit of a parameter with `ndim` dimensions.

  Scalars and vectors (gains, biases, skip gains) are one unit (None: reduce everything). Higher-rank
  weights have one unit per output channel, the last axis: (0,) for an (I, O) linear, (0, 1, 2) for an HWIO
  kernel, and likewise for 1D/3D kernels. (optax's default treats rank 3 as multi-head (I, H, D) linears;
  no model in this project has those, and a (W, I, O) conv kernel needs all-but-last.)
  """
  if ndim <= 1:
    return None
  return tuple(range(ndim - 1))


class AdaptiveGradClipState(NamedTuple):
  """State of `adaptive_grad_clip`: the fraction of clipped units in the last update (float32 scalar)."""
  clipped_fraction: jax.Array


def _clip_unitwise(clipping: float, eps: float) -> optax.GradientTransformation:
  """AGC on every leaf it sees, reporting the clipped fraction; `adaptive_grad_clip` masks it."""

  def init_fn(params):
    del params
    return AdaptiveGradClipState(clipped_fraction=jnp.zeros((), jnp.float32))

  def clip_leaf(grad, param):
    axis = unit_axes(grad.ndim)
    # Norms of bfloat16 gradients lose too much precision (8-bit mantissa) over large units.
    grad32 = jnp.asarray(grad, jnp.float32)
    param32 = jnp.asarray(param, jnp.float32)
    clipped, _ = optax.adaptive_grad_clip(clipping, eps, axis=axis).update(grad32, optax.EmptyState(), param32)
    # Same norms as inside optax's clip (XLA merges the duplicates under jit); one entry per unit.
    grad_norm = optax.transforms.unitwise_norm(grad32, axis=axis)
    max_norm = clipping * jnp.maximum(optax.transforms.unitwise_norm(param32, axis=axis), eps)
    exceeds = grad_norm > max_norm
    # unitwise_norm broadcasts each unit's norm over the unit; keep one entry per unit.
    per_unit = exceeds.reshape(-1)[:1] if axis is None else exceeds[(0,) * (grad.ndim - 1)]
    return clipped.astype(jnp.result_type(grad)), (jnp.sum(per_unit, dtype=jnp.float32), per_unit.size)

  def update_fn(updates, state, params=None):
    del state
    if params is None:
      raise ValueError('adaptive_grad_clip needs the current params: call update(grads, state, params)')
    treedef = jax.tree.structure(updates)
    results = [clip_leaf(g, p) for g, p in zip(treedef.flatten_up_to(updates), treedef.flatten_up_to(params))]
    clipped_updates = treedef.unflatten([r[0] for r in results])
    num_clipped = sum((r[1][0] for r in results), jnp.zeros((), jnp.float32))
    num_units = sum(r[1][1] for r in results)
    fraction = num_clipped / max(num_units, 1)
    return clipped_updates, AdaptiveGradClipState(clipped_fraction=fraction)

  return optax.GradientTransformation(init_fn, update_fn)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3,
                       exclude: Optional[ExcludeFn] = param_paths.is_final_classifier_weight
                       ) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping, skipping the leaves whose (module, param) path `exclude` accepts.

  Args:
    clipping: lambda, the largest allowed ratio ||G_i|| / max(||W_i||, eps) (0.01 in the NFNet recipe).
    eps: floor on the parameter norm, so zero-initialised parameters (skip gains) still learn.
    exclude: predicate on a leaf's (module_name, param_name); matching leaves pass through unchanged.
      The default leaves only the final classifier weight unclipped; None clips everything.

  Returns:
    A GradientTransformation whose update needs `params`; chain any optax optimizer after it.
  """
  if not clipping > 0:
    raise ConfigError(f'AGC clipping must be > 0, got {clipping}; use clip_mode "none" to disable clipping')
  if not eps > 0:
    raise ConfigError(f'AGC eps must be > 0, got {eps}')
  inner = _clip_unitwise(float(clipping), float(eps))
  if exclude is None:
    return inner
  return optax.masked(inner, lambda tree: param_paths.path_mask(tree, lambda path, _: not exclude(path)))


def clipped_fraction(opt_state: Any) -> Optional[jax.Array]:
  """The fraction of units AGC clipped in the last update, found anywhere in `opt_state`; None without AGC.

  Works through optax.chain, optax.masked, optax.contrib.sam and similar wrappers. Under pmap the value has
  the leading device axis like the rest of the state.
  """
  found = optax.tree_utils.tree_get_all_with_path(
      opt_state, 'clipped_fraction',
      filtering=lambda path, _: getattr(path[-1], 'tuple_name', None) == AdaptiveGradClipState.__name__)
  if not found:
    return None
  if len(found) > 1:
    raise ValueError(f'found {len(found)} AGC states in the optimizer state; expected at most one')
  return found[0][1]
