"""Multiply-accumulate counting by abstract tracing (no compute, no memory for activations)."""
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from nfnets import models


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


def model_macs(model_config, resolution: int) -> int:
  """Forward-pass MACs of one image through the configured model at `resolution`² (eval mode).

  Grouped convolutions are traced as one grouped convolution, so each counts its true MACs.
  """
  model_config = dict(model_config)
  if 'grouped_conv' in model_config:
    model_config['grouped_conv'] = 'native'
  forward = models.make_forward(model_config)
  image = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  params, state = models.abstract_params(model_config)
  return count_macs(lambda p, s, x: forward.apply(p, s, None, x, is_training=False), params, state, image)


def model_param_count(model_config) -> int:
  """Number of parameters of the configured model (abstract init; no memory is allocated)."""
  params, _ = models.abstract_params(model_config)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
