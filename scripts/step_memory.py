"""The memory XLA assigns to the compiled train step, per device, without running it (`scripts.benchmark memory`).

The step is the loop's own (`trainer.setup_training`), pmapped over one device with the train state donated, as
the loop runs it on an accelerator (`trainer.pmap_train_step` does not donate on CPU, where an undonated state
would add a second copy of it to the figures). It is lowered from shapes alone: the train state comes from
`jax.eval_shape` of the loop's `train_state.fresh_train_state` and the batch from the input pipeline's layout,
so no parameter is allocated and no step runs; only XLA's compile costs time. `compiled.memory_analysis()`
then gives XLA's buffer assignment on the current backend:

  arguments    the train state and the batch
  outputs      the new state and the metrics
  aliased      outputs that reuse a donated argument's buffer (the new state)
  temporaries  everything else live at the step's peak: activations kept for the backward pass, gradients,
               the optimiser's intermediates
  total        arguments + outputs - aliased + temporaries: what the step needs on the device

Beside XLA's figures, `saved_activation_bytes`: the activations JAX's autodiff keeps from the forward pass
for the backward pass of one device's loss (the residuals of its VJP, not counting the parameters and the
batch, which are arguments). It is what rematerialisation reduces, computed from the program before any
compiler sees it, so it is the same on every backend. It matters on CPU: XLA CPU's compiled program keeps no
optimisation barrier and no recomputation (they are merged back into the forward pass), so a CPU compile
shows no saving from `config.model.remat` (docs/memory.md). `--nocompile` reports only this figure and the
state's size (fast: tracing, no XLA compile).

A pmapped step's per-device program is the same on one device as on many (only its collectives differ), so
the figures are per device for any device count at this per-device batch. They are the compiler's plan, not a
measurement of a run: an accelerator's allocator adds fragmentation and its runtime a reserve on top.
"""
import time
from typing import Any

import jax
from jax._src import ad_checkpoint  # `saved_residuals`: what the public `print_saved_residuals` prints
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets import accumulation
from nfnets import distributed
from nfnets import train_state as train_state_lib
from nfnets import trainer
from nfnets.data import sources
from nfnets.models import layers

GIB = 2**30


def training_setup(config: ml_collections.ConfigDict) -> trainer.TrainingSetup:
  """The loop's model, optimiser and per-device step for `config` on one device, whose data need not be
  present."""
  info = sources.dataset_info(config.data)
  num_train_examples = info.num_examples.get(config.data.train_split, 1000 * config.train.batch_size)
  return trainer.setup_training(config, num_train_examples, num_devices=1)


def one_device_config(config: ml_collections.ConfigDict, micro_batch: int) -> ml_collections.ConfigDict:
  """`config` with the batch of one device's update: `micro_batch` examples per forward pass, times
  `config.train.accumulation_steps` micro-batches (the step's memory does not depend on the device count)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = micro_batch * config.train.get('accumulation_steps', 1)
  return config


def train_batch_spec(config: ml_collections.ConfigDict, micro_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of one device's training batch, as `pipeline.make_train_iterator` yields it
  (uint8 images, float32 mixed one-hot labels; `micro_batch` × accumulation steps examples), with the
  leading device axis of one device."""
  spec = accumulation.per_device_batch_spec(one_device_config(config, micro_batch), num_devices=1)
  return {key: jax.ShapeDtypeStruct((1, *value.shape), value.dtype) for key, value in spec.items()}


def abstract_train_state(setup: trainer.TrainingSetup, config: ml_collections.ConfigDict) -> Any:
  """The replicated train state of one device as `jax.ShapeDtypeStruct`s; nothing is allocated."""
  state = jax.eval_shape(lambda: train_state_lib.fresh_train_state(
      setup.forward, setup.optimizer, config.seed, config.data.train_resolution))
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((1, *leaf.shape), leaf.dtype), state)


def compile_options() -> dict[str, Any]:
  # XLA CPU's LLVM code generation dominates its compile time and does not change the buffer assignment
  # (the figures are identical at level 0): skip its optimisations, the program is never run.
  return {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else {}


def compile_train_step(config: ml_collections.ConfigDict, per_device_batch: int) -> jax.stages.Compiled:
  """The loop's train step for `config`, compiled for one device at `per_device_batch` examples per forward
  pass (the micro-batch under `config.train.accumulation_steps`), from shapes alone."""
  setup = training_setup(one_device_config(config, per_device_batch))
  step = jax.pmap(setup.train_step, axis_name=distributed.AXIS_NAME, devices=jax.local_devices()[:1],
                  donate_argnums=(0,))
  lowered = step.lower(abstract_train_state(setup, config), train_batch_spec(config, per_device_batch))
  return lowered.compile(compile_options())


def memory_figures(compiled: jax.stages.Compiled) -> dict[str, int]:
  """XLA's per-device memory of `compiled`, in bytes (see the module's docstring)."""
  stats = compiled.memory_analysis()
  stats = stats[0] if isinstance(stats, (list, tuple)) else stats
  figures = {
      'argument_bytes': int(stats.argument_size_in_bytes),
      'output_bytes': int(stats.output_size_in_bytes),
      'aliased_bytes': int(stats.alias_size_in_bytes),
      'temporary_bytes': int(stats.temp_size_in_bytes),
  }
  figures['total_bytes'] = (figures['argument_bytes'] + figures['output_bytes'] - figures['aliased_bytes']
                            + figures['temporary_bytes'])
  return figures


def _nbytes(leaf) -> int:
  return int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


def saved_activation_bytes(config: ml_collections.ConfigDict, per_device_batch: int) -> int:
  """Bytes the forward pass of one device's training loss keeps for its backward pass, arguments excluded."""
  setup = training_setup(config)
  state = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype),
                       abstract_train_state(setup, config))
  images = jax.ShapeDtypeStruct(train_batch_spec(config, per_device_batch)['images'].shape[1:], jnp.float32)

  def loss(params, images):
    logits, _ = setup.forward.apply(params, state.model_state, jax.random.PRNGKey(0), images, is_training=True)
    return jnp.mean(logits.astype(jnp.float32))

  residuals = ad_checkpoint.saved_residuals(loss, state.params, images)
  return sum(_nbytes(aval) for aval, source in residuals if not source.startswith('from the argument'))


def saved_activations(config: ml_collections.ConfigDict, per_device_batch: int) -> dict[str, int]:
  """`saved_activation_bytes` at `per_device_batch`, and its growth per example (from a second trace at twice
  the batch): without remat the kept tensors include batch-independent ones, e.g. the standardised weights."""
  at_batch = saved_activation_bytes(config, per_device_batch)
  per_example = (saved_activation_bytes(config, 2 * per_device_batch) - at_batch) // per_device_batch
  return {'saved_activation_bytes': at_batch, 'saved_activation_bytes_per_example': per_example}


def report(config: ml_collections.ConfigDict, per_device_batch: int, compile_step: bool = True) -> dict[str, Any]:
  """The memory report of `config`'s train step at `per_device_batch` examples per device; without
  `compile_step`, only the state's size and the saved activations (no XLA compile)."""
  activations = saved_activations(config, per_device_batch)
  if compile_step:
    start = time.perf_counter()
    compiled = compile_train_step(config, per_device_batch)
    compile_s = time.perf_counter() - start
    figures = memory_figures(compiled)
  else:
    state = abstract_train_state(training_setup(config), config)
    figures = {'state_bytes': sum(_nbytes(leaf) for leaf in jax.tree.leaves(state))}
  figures.update(activations)
  return {
      'benchmark': 'memory',
      'model': f'{config.model.name} {config.model.get("variant", "")}'.strip(),
      'resolution': config.data.train_resolution,
      'per_device_batch': per_device_batch,
      'accumulation_steps': config.train.get('accumulation_steps', 1),
      'dtype': config.precision.compute_dtype,
      'remat': bool(config.model.get('remat', False)),
      'grouped_conv': layers.resolve_grouped_conv(config.model.get('grouped_conv', 'auto')),
      'backend': jax.default_backend(),
      'device': jax.local_devices()[0].device_kind,
      **({'state_donated': True} if compile_step else {}),
      **figures,
      **{name.replace('_bytes', '_gib'): round(value / GIB, 3) for name, value in figures.items()},
      **({'compile_s': round(compile_s, 1)} if compile_step else {}),
  }
