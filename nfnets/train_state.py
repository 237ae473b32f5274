"""`TrainState`, what a run carries from step to step, and `create_train_state`: where a run starts. Fresh from
the seed, resumed from the workdir, or initialised from a checkpoint (project or reference format) with the
classifier replaced for a new class count (fine-tuning).
"""
from typing import Any, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nfnets import checkpoint
from nfnets import models
from nfnets.errors import CheckpointError


DEFAULT_INITIAL_LOSS_SCALE = 2.0 ** 15


class TrainState(NamedTuple):
  step: jax.Array               # int32 scalar: updates applied or skipped so far
  params: hk.Params             # float32 master weights
  model_state: hk.State         # empty for NFNets; batch statistics for normalised baselines
  opt_state: optax.OptState
  ema_params: hk.Params
  ema_model_state: hk.State
  rng: jax.Array                # base key; per-step, per-device keys are folded from it
  nonfinite_streak: jax.Array   # int32: consecutive updates skipped for a non-finite loss or gradient
  # float16 compute's dynamic loss scale (jmp.DynamicLossScale's two arrays); unused in other dtypes.
  loss_scale: jax.Array         # float32
  loss_scale_counter: jax.Array  # int32: updates since the scale last changed
  # Updates skipped since the run began, by cause (float16 overflow under loss scaling; non-finite).
  skipped_overflow: jax.Array   # int32
  skipped_nonfinite: jax.Array  # int32


def init_train_state(forward: hk.TransformedWithState, optimizer: optax.GradientTransformation,
                     rng: jax.Array, sample_images: jax.Array,
                     initial_loss_scale: float = DEFAULT_INITIAL_LOSS_SCALE) -> TrainState:
  """A fresh state; `sample_images` only fixes shapes (one example is enough)."""
  init_rng, step_rng = jax.random.split(rng)
  params, model_state = forward.init(init_rng, sample_images, is_training=True)
  zero = jnp.zeros([], jnp.int32)
  return TrainState(
      step=zero,
      params=params,
      model_state=model_state,
      opt_state=optimizer.init(params),
      ema_params=params,
      ema_model_state=model_state,
      rng=step_rng,
      nonfinite_streak=zero,
      loss_scale=jnp.asarray(initial_loss_scale, jnp.float32),
      loss_scale_counter=zero,
      skipped_overflow=zero,
      skipped_nonfinite=zero,
  )


def fresh_train_state(forward, optimizer: optax.GradientTransformation, seed: int, resolution: int,
                      initial_loss_scale: float = DEFAULT_INITIAL_LOSS_SCALE
                      ) -> TrainState:
  """The run's starting point, a function of `seed` alone (on the default device)."""
  return jax.jit(init_train_state, static_argnums=(0, 1))(
      forward, optimizer, jax.random.PRNGKey(seed), jnp.zeros((1, resolution, resolution, 3), jnp.float32),
      initial_loss_scale)


def graft(fresh: Any, loaded: Any, *, replaceable_module: str, source: str) -> tuple[Any, list[str]]:
  """`fresh` with every leaf taken from `loaded`, except `replaceable_module`'s leaves when their shapes differ.

  Returns the grafted tree and the names of the leaves that kept their fresh initialisation. Any other
  missing module, parameter or shape difference is a `CheckpointError` naming `source`.
  """
  grafted, kept_fresh = {}, []
  for module, leaves in fresh.items():
    if module not in loaded:
      raise CheckpointError(f'{source} has no module {module!r}; it holds a different architecture')
    grafted[module] = {}
    for name, leaf in leaves.items():
      if name not in loaded[module]:
        raise CheckpointError(f'{source} has no parameter {module}/{name}')
      value = np.asarray(loaded[module][name])
      if value.shape == leaf.shape:
        grafted[module][name] = jnp.asarray(value, leaf.dtype)
      elif module == replaceable_module:
        grafted[module][name] = leaf
        kept_fresh.append(f'{module}/{name}')
      else:
        raise CheckpointError(f'{source}: {module}/{name} has shape {value.shape}, the model needs {leaf.shape}')
  extra = sorted(set(loaded) - set(fresh))
  if extra:
    raise CheckpointError(f'{source} has module {extra[0]!r} that the model lacks')
  return grafted, kept_fresh


def initialized_from(state: TrainState, optimizer: optax.GradientTransformation,
                     model_config: ml_collections.ConfigDict, path: str) -> tuple[TrainState, str]:
  """`state` with its weights taken from the checkpoint at `path` (EMA weights when it has them)."""
  source = checkpoint.read(path)
  if source.model_config['name'] != model_config.name:
    raise CheckpointError(f'{path} holds a {source.model_config["name"]} model, the config a {model_config.name}')
  params, model_state = source.weight_sets.get('ema_', source.weight_sets[''])
  classifier = models.get_family(model_config.name).classifier_module
  params, kept_fresh = graft(state.params, params, replaceable_module=classifier, source=source.path)
  model_state, _ = graft(state.model_state, model_state, replaceable_module=classifier, source=source.path)
  state = state._replace(params=params, model_state=model_state, opt_state=optimizer.init(params),
                         ema_params=params, ema_model_state=model_state)
  note = f'initialised from {source.path}'
  if kept_fresh:
    note += f' with a new classifier ({", ".join(kept_fresh)} freshly initialised)'
  return state, note


def create_train_state(setup, config: ml_collections.ConfigDict, *,
                       checkpointer: Optional[checkpoint.TrainingCheckpointer] = None,
                       data_iterator: Any = None) -> tuple[TrainState, str]:
  """The state a run starts from, and a sentence saying where it came from.

  In order: the workdir's latest checkpoint (resume, data iterator repositioned in place); else
  `config.init_from` (fine-tuning: weights only, a fresh optimiser, step 0); else fresh from `config.seed`.
  """
  state = fresh_train_state(setup.forward, setup.optimizer, config.seed, config.data.train_resolution,
                            config.precision.get('initial_loss_scale', DEFAULT_INITIAL_LOSS_SCALE))
  latest = checkpointer.latest_step() if checkpointer is not None else None
  if latest is not None:
    return checkpointer.restore(latest, state, data_iterator), f'resumed from step {latest}'
  if config.get('init_from'):
    return initialized_from(state, setup.optimizer, config.model, config.init_from)
  return state, f'initialised from seed {config.seed}'
