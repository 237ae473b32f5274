"""Multiply-accumulate counting by abstract tracing (no compute, no memory for activations)."""
import math
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from nfnets import nfnet


def _sub_jaxprs(value: Any):
  """Yields every Jaxpr held (directly or in a tuple/list) by an equation parameter."""
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def _conv_macs(eqn) -> int:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  # rhs already holds in_features / feature_group_count on its input-feature axis, so every
  # output element costs prod(rhs.shape) / out_features multiply-accumulates.
  out_feature_axis = eqn.params['dimension_numbers'].rhs_spec[0]
  return math.prod(out.shape) * math.prod(rhs.shape) // rhs.shape[out_feature_axis]


def _dot_macs(eqn) -> int:
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  return math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def jaxpr_macs(jaxpr) -> int:
  """MACs of convolutions and dot products in `jaxpr`, recursing into sub-jaxprs.

  `scan` bodies count `length` times, `cond` counts its most expensive branch and `while`
  bodies count once (their trip count is unknown when tracing).
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_macs(eqn)
    elif name == 'dot_general':
      total += _dot_macs(eqn)
    elif name == 'cond':
      total += max(jaxpr_macs(b) for b in _sub_jaxprs(eqn.params['branches']))
    else:
      repeats = eqn.params['length'] if name == 'scan' else 1
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += repeats * jaxpr_macs(sub)
  return total


def count_macs(fn: Callable[..., Any], *example_args: Any) -> int:
  """Multiply-accumulates of one call `fn(*example_args)`, from its traced jaxpr.

  Arguments may be arrays or `jax.ShapeDtypeStruct`s; nothing is computed. Counts
  `conv_general_dilated` (respecting feature groups) and `dot_general`.
  """
  closed = jax.make_jaxpr(fn)(*example_args)
  return jaxpr_macs(closed.jaxpr)


def nfnet_macs(variant: str, resolution: int, num_classes: int = 1000) -> int:
  """Forward-pass MACs of one image through NFNet `variant` at `resolution`² (eval mode)."""
  nfnet.get_variant(variant)
  model = hk.transform(
      lambda x: nfnet.NFNet(num_classes, variant, grouped_conv='native')(x, is_training=False))
  image = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
  return count_macs(lambda p, x: model.apply(p, None, x), params, image)


def nfnet_param_count(variant: str, num_classes: int = 1000) -> int:
  """Number of parameters of NFNet `variant` (abstract init; no memory is allocated)."""
  nfnet.get_variant(variant)
  model = hk.transform(lambda x: nfnet.NFNet(num_classes, variant)(x, is_training=False))
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
