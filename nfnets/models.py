"""Builds a model's Haiku forward function from `config.model`, with the mixed-precision policy applied.

Every model family registers its module class here by `config.model.name`; the rest of the library only
sees `make_forward(...)`, an `hk.TransformedWithState` whose apply is
`(params, state, rng, images, is_training) -> (logits, state)`.
"""
from typing import Any

import haiku as hk
import jmp
import ml_collections

from nfnets import nfnet

MODEL_FAMILIES: dict[str, type[hk.Module]] = {
    'nfnet': nfnet.NFNet,
}

# Config keys that are not constructor arguments of the module.
_NON_MODULE_KEYS = ('name',)


def model_kwargs(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The module's constructor arguments: every config entry but the family name; None entries left out."""
  kwargs = {k: v for k, v in model_config.to_dict().items() if k not in _NON_MODULE_KEYS and v is not None}
  for key in ('depths', 'widths'):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  return kwargs


def model_class(model_config: ml_collections.ConfigDict) -> type[hk.Module]:
  if model_config.name not in MODEL_FAMILIES:
    raise ValueError(f'unknown model {model_config.name!r}; known: {", ".join(sorted(MODEL_FAMILIES))}')
  return MODEL_FAMILIES[model_config.name]


def precision_policy(compute_dtype: str) -> jmp.Policy:
  """float32 parameters and outputs (logits), `compute_dtype` activations and matmuls."""
  if compute_dtype not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f'unknown compute dtype {compute_dtype!r}; use float32, bfloat16 or float16')
  return jmp.get_policy(f'params=float32,compute={compute_dtype},output=float32')


def make_forward(model_config: ml_collections.ConfigDict,
                 compute_dtype: str = 'float32') -> hk.TransformedWithState:
  """The model as a pure `init`/`apply` pair.

  The policy is pushed inside the transformed function (not set globally) so two models with different
  precisions can live in one process, e.g. a bfloat16 train step and a float32 reference check.
  """
  cls = model_class(model_config)
  kwargs = model_kwargs(model_config)
  policy = precision_policy(compute_dtype)

  def forward(images, is_training: bool):
    with hk.mixed_precision.push_policy(cls, policy):
      return cls(**kwargs)(images, is_training=is_training)

  return hk.transform_with_state(forward)

