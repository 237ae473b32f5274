"""The model registry: every model family the project trains, evaluates and counts, by `config.model.name`.

A family is one file in this package that exports its Haiku module and its architecture table (`VARIANTS`)
and registers a `ModelFamily`. The rest of the library reaches models only through this registry:

  make_forward(model_config, compute_dtype)  the model as an `hk.TransformedWithState` whose apply is
                                             `(params, state, rng, images, is_training) -> (logits, state)`
  abstract_params(model_config)              parameter and state shapes, nothing allocated
  get_family(name).classifier_module         the head that fine-tuning replaces for a new class count

To add a family: write `nfnets/models/<family>.py` with its block and its module (the NF schedule, residual
merge and shortcut are `layers`'), its `VARIANTS` table and a `register(ModelFamily(...))` call whose
`default_model_config` is `signature_config(name, module)`, import it at the bottom of this file, and add
`configs/<family>.py`.
"""
import collections.abc
import contextlib
import dataclasses
import inspect
import typing
from typing import Any, Callable, Mapping, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import ml_collections

from nfnets.errors import ConfigError
from nfnets.errors import UserError  # pylint: disable=unused-import  (re-exported for callers)

Params = Mapping[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """What the library needs to know about one family of models.

  Attributes:
    name: the family's `config.model.name`, e.g. 'nfnet'.
    module: the Haiku module; constructed as `module(**model_kwargs)` and called as
      `module(images, is_training=...)`, returning logits (`return_metrics=True` adds signal propagation).
    variants: the architecture table, variant name -> architecture entries (no recipe numbers).
    default_model_config: variant -> the `config.model` section: exactly the module's arguments plus `name`;
      `signature_config(name, module)` reads it off the constructor, so the defaults are written once.
    classifier_module: the Haiku module name of the final classifier (not clipped by AGC; re-initialised when
      fine-tuning to a new number of classes).
    config_from_reference: for families with published reference checkpoints, a function that recognises a
      reference params tree and returns the model config entries it implies (variant, num_classes), raising
      `CheckpointError` when the tree is not one of the family's.
    training_only_keys: `config.model` entries that change training but not the function a trained model
      computes (regularisation, how a convolution is executed); they may differ between a checkpoint and the
      config that evaluates it.
    float32_modules: module classes that compute in float32 whatever the compute dtype (e.g. batch
      normalisation: its statistics and moving averages lose too much in bfloat16); `make_forward` gives them
      float32 parameters, state and computation, and casts their outputs back to the compute dtype.
  """
  name: str
  module: type[hk.Module]
  variants: Mapping[str, Mapping[str, Any]]
  default_model_config: Callable[[str], ml_collections.ConfigDict]
  classifier_module: str
  config_from_reference: Optional[Callable[[Params], dict[str, Any]]] = None
  training_only_keys: tuple[str, ...] = ()
  float32_modules: tuple[type[hk.Module], ...] = ()


# `config.model` entries that change only memory and time, never the numbers a step computes: a run may
# resume with another value (e.g. turn remat on after running out of memory), and older runs lack them.
EXECUTION_ONLY_KEYS = ('remat',)

_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
  if family.name in _FAMILIES:
    raise ValueError(f'model family {family.name!r} is registered twice')
  _FAMILIES[family.name] = family
  return family


def family_names() -> tuple[str, ...]:
  return tuple(sorted(_FAMILIES))


def get_family(name: str) -> ModelFamily:
  if name not in _FAMILIES:
    raise ConfigError(f'unknown model {name!r}; known: {", ".join(family_names())}')
  return _FAMILIES[name]


def get_variant(name: str, variant: str) -> Mapping[str, Any]:
  """The architecture-table entry of `variant`, with a one-line error for unknown names."""
  family = get_family(name)
  if variant not in family.variants:
    raise ConfigError(f'unknown {name} variant {variant!r}; known: {", ".join(family.variants)}')
  return family.variants[variant]


def _placeholder_type(annotation: Any) -> type:
  """The type of a constructor argument annotated `T | None` (sequences: tuple, as configs hold them)."""
  kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
  kind = typing.get_origin(kinds[0]) or kinds[0]
  return tuple if kind in (collections.abc.Sequence, list, tuple) else kind


def signature_config(name: str, module: type[hk.Module]) -> Callable[..., ml_collections.ConfigDict]:
  """A family's `default_model_config`, read off `module`'s constructor so its defaults are written once.

  The `config.model` for a variant is `name`, the variant, and every other constructor argument (but the Haiku
  module `name`) at its default; an argument defaulting to None becomes a typed placeholder (None: the
  variant's table entry decides).
  """
  parameters = list(inspect.signature(module.__init__).parameters.values())[1:]
  hints = typing.get_type_hints(module.__init__)
  missing = [p.name for p in parameters if p.default is inspect.Parameter.empty]
  if missing:
    raise TypeError(f'{module.__name__} arguments {missing} need defaults to be config entries')
  default_variant = next(p.default for p in parameters if p.name == 'variant')

  def default_model_config(variant: str = default_variant) -> ml_collections.ConfigDict:
    get_variant(name, variant)
    entries = dict(name=name, variant=variant)
    for parameter in parameters:
      if parameter.name in entries:
        continue
      default = parameter.default
      if default is None:
        default = ml_collections.config_dict.placeholder(_placeholder_type(hints[parameter.name]))
      entries[parameter.name] = default
    return ml_collections.ConfigDict(entries)

  default_model_config.__doc__ = f'`config.model` for {module.__name__} `variant`: its constructor\'s defaults.'
  return default_model_config


def model_config(name: str, variant: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The family's default `config.model` for `variant`, with `overrides` applied."""
  get_variant(name, variant)
  config = get_family(name).default_model_config(variant)
  config.update(overrides)
  return config


def model_kwargs(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The module's constructor arguments: every config entry but the family name; None entries left out."""
  entries = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in entries.items() if k != 'name' and v is not None}


def build(config: ml_collections.ConfigDict | Mapping[str, Any]) -> hk.Module:
  """Constructs the configured module (inside a Haiku transform)."""
  family = get_family(config['name'])
  get_variant(family.name, config['variant'])
  return family.module(**model_kwargs(config))


def contradiction(config: Mapping[str, Any], stored: Mapping[str, Any]) -> Optional[str]:
  """How model config `config` contradicts the `stored` one of a checkpoint (None if it does not)."""
  if config['name'] != stored['name']:
    return f'name {config["name"]!r} vs {stored["name"]!r}'
  ignored = set(get_family(stored['name']).training_only_keys)
  for key in sorted(set(config) | set(stored)):
    mine, theirs = config.get(key), stored.get(key)
    mine, theirs = (tuple(v) if isinstance(v, (list, tuple)) else v for v in (mine, theirs))
    if key not in ignored and mine != theirs:
      return f'{key} {mine!r} vs {theirs!r}'
  return None


def precision_policy(compute_dtype: str) -> jmp.Policy:
  """float32 parameters and outputs (logits), `compute_dtype` activations and matmuls."""
  # float16 gradients underflow unless the loss is scaled: the train step does so for float16 compute.
  if compute_dtype not in ('float32', 'bfloat16', 'float16'):
    raise ConfigError(f'unknown compute dtype {compute_dtype!r}; use float32, bfloat16 or float16')
  return jmp.get_policy(f'params=float32,compute={compute_dtype},output=float32')


def make_forward(config: ml_collections.ConfigDict | Mapping[str, Any],
                 compute_dtype: str = 'float32', **call_kwargs: Any) -> hk.TransformedWithState:
  """The model as a pure `init`/`apply` pair.

  The policies are pushed inside the transformed function (not set globally) so two models with different
  precisions can live in one process, e.g. a bfloat16 train step and a float32 evaluation. The family's
  `float32_modules` get a float32 policy nested inside the model's (Haiku applies the innermost one).
  `call_kwargs` go to the module's call (e.g. `return_metrics=True`).
  """
  family = get_family(config['name'])
  kwargs = model_kwargs(config)
  get_variant(family.name, kwargs['variant'])
  policy = precision_policy(compute_dtype)
  float32_policy = jmp.get_policy(f'params=float32,compute=float32,output={compute_dtype}')

  def forward(images, is_training: bool):
    with contextlib.ExitStack() as policies:
      policies.enter_context(hk.mixed_precision.push_policy(family.module, policy))
      for module in family.float32_modules:
        policies.enter_context(hk.mixed_precision.push_policy(module, float32_policy))
      return family.module(**kwargs)(images, is_training=is_training, **call_kwargs)

  return hk.transform_with_state(forward)


def abstract_params(config: ml_collections.ConfigDict | Mapping[str, Any], resolution: int = 32):
  """(params, state) of the configured model as `jax.ShapeDtypeStruct` trees; nothing is allocated.

  Parameter shapes of these models do not depend on the image size, so a small `resolution` is enough.
  """
  forward = make_forward(config)
  image = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(lambda x: forward.init(jax.random.PRNGKey(0), x, is_training=True), image)


# Families register themselves on import.
# pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.models import nf_regnet
from nfnets.models import nf_resnet
from nfnets.models import nfnet
from nfnets.models import se_resnext
