"""Times the real pmapped train and eval steps on one device: the library of `scripts.benchmark train|eval`.

The steps are built exactly as the training loop builds them (`trainer.setup_training`,
`train_state.create_train_state`, `trainer.pmap_train_step` / `pmap_eval_step`, pmapped over one device)
and fed a batch made by the project's own input pipeline from the synthetic dataset, so the batch has
whatever layout and dtype the loop's batches have. Reported per run: tracing and XLA compile seconds,
step seconds (median and min after warm-up), images/s, the process's CPU seconds per step, XLA's FLOP
count of the compiled step, the achieved FLOP/s, the device's matmul peak measured in the same process
in the step's dtype, their ratio (MFU), the peak host memory and the machine's load average. Nothing
here is CPU-specific: on a GPU or TPU the same command reports the accelerator's figures.
"""
import os
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets import distributed
from nfnets import train_state as train_state_lib
from nfnets import train_step as train_step_lib
from nfnets import trainer
from nfnets.models import layers
from nfnets.data import pipeline
from scripts import step_memory


def apply_overrides(config: ml_collections.ConfigDict, *, batch: int, resolution: int,
                    dtype: str | None, remat: bool | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` with the benchmark's batch size, resolution and (unless None) compute dtype, each
  set for training and evaluation alike, and (unless None) the model's rematerialisation."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = batch
  config.train.eval_batch_size = batch
  config.data.train_resolution = resolution
  config.data.eval_resolution = resolution
  if dtype is not None:
    config.precision.compute_dtype = dtype
    config.precision.eval_compute_dtype = dtype
  if remat is not None:
    config.model.remat = remat
  return config


def _synthetic_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update(name='synthetic', train_split='train', eval_split='validation', num_workers=0)
  return data


def train_batch(config: ml_collections.ConfigDict, num_devices: int = 1) -> dict[str, np.ndarray]:
  """One training batch from the project's pipeline (synthetic images, the config's augmentation)."""
  iterator = pipeline.make_train_iterator(
      _synthetic_data(config), global_batch_size=config.train.batch_size, seed=config.seed,
      num_classes=config.model.num_classes, process_index=0, process_count=1,
      local_device_count=num_devices)
  return next(iterator)


def eval_batch(config: ml_collections.ConfigDict, num_devices: int = 1) -> dict[str, np.ndarray]:
  """One evaluation batch from the project's pipeline (synthetic images)."""
  iterator = pipeline.make_eval_iterator(
      _synthetic_data(config), global_batch_size=config.train.eval_batch_size, process_index=0,
      process_count=1, local_device_count=num_devices)
  return next(iterator)


def matmul_peak_flops(dtype: str, size: int, repeats: int = 5, device=None) -> float:
  """The best FLOP/s of a jitted size x size matmul in `dtype` on `device`.

  Low-precision inputs are also tried with float32 accumulation and output (how mixed-precision convs
  and matmuls run), and the faster of the two counts.
  """
  device = device or jax.local_devices()[0]
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), dtype), device) for k in keys)
  output_dtypes = [None] if dtype == 'float32' else [None, jnp.float32]
  best = 0.0
  for output_dtype in output_dtypes:
    matmul = jax.jit(lambda x, y, t=output_dtype: jnp.dot(x, y, preferred_element_type=t))
    jax.block_until_ready(matmul(a, b))
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(matmul(a, b))
      best = max(best, 2 * size**3 / (time.perf_counter() - start))
  return best


def default_matmul_size() -> int:
  # Large enough to reach the peak: 2048 saturates the CPU, accelerators need more work per call.
  return 2048 if jax.default_backend() == 'cpu' else 8192


def _process_cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


class _TimedStep:
  """A pmapped step lowered and compiled once, then run on its own outputs (as the loop does)."""

  def __init__(self, pmapped: Callable[..., Any], args: tuple, carry_state: bool):
    start = time.perf_counter()
    lowered = pmapped.lower(*args)
    self.trace_s = time.perf_counter() - start
    start = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float((cost or {}).get('flops', 0.0))
    self.args = args
    self.carry_state = carry_state
    self.times: list[float] = []
    self.cpu_times: list[float] = []

  def run(self, record: bool) -> None:
    start, start_cpu = time.perf_counter(), _process_cpu_seconds()
    outputs = self.compiled(*self.args)
    jax.block_until_ready(outputs)
    elapsed, cpu = time.perf_counter() - start, _process_cpu_seconds() - start_cpu
    if self.carry_state:  # the train step's new state is the next step's input
      self.args = (outputs[0],) + self.args[1:]
    if record:
      self.times.append(elapsed)
      self.cpu_times.append(cpu)

  def report(self, batch_size: int, peak_flops: float) -> dict[str, Any]:
    median = statistics.median(self.times)
    achieved = self.flops / median if self.flops else 0.0
    return {
        'trace_s': round(self.trace_s, 2),
        'compile_s': round(self.compile_s, 2),
        'step_s_median': round(median, 4),
        'step_s_min': round(min(self.times), 4),
        'images_per_s': round(batch_size / median, 2),
        # This process's CPU seconds per step (all threads): on a shared CPU machine it moves far less
        # with other processes' load than the wall time does.
        'host_cpu_s_per_step': round(statistics.median(self.cpu_times), 3),
        'flops_per_step': self.flops,
        'achieved_flops_per_s': achieved,
        'mfu': round(achieved / peak_flops, 4) if peak_flops else None,
    }


def _build(kind: str, config: ml_collections.ConfigDict, batch: dict[str, np.ndarray]) -> _TimedStep:
  devices = jax.local_devices()[:1]
  setup = step_memory.training_setup(config)
  state, _ = train_state_lib.create_train_state(setup, config)
  state = distributed.replicate(state, distributed.AXIS_NAME, devices)
  if kind == 'train':
    return _TimedStep(trainer.pmap_train_step(setup, devices), (state, batch), carry_state=True)
  weight_sets = train_step_lib.eval_weight_sets(state)
  return _TimedStep(trainer.pmap_eval_step(config, devices), (weight_sets, batch), carry_state=False)


def run(kind: str, config: ml_collections.ConfigDict, *, steps: int, warmup: int,
        baseline_grouped_conv: str | None = None, matmul_size: int | None = None) -> dict[str, Any]:
  """Benchmarks the 'train' or 'eval' step of `config` (already overridden) on one device.

  With `baseline_grouped_conv`, the same step with the model's grouped convs in that mode is built
  too, and the two run alternately, so that load changes on a shared machine hit both alike.
  """
  if kind not in ('train', 'eval'):
    raise ValueError(f'unknown step {kind!r}; use train or eval')
  load_at_start = os.getloadavg()[0]  # other processes' load skews timings on a shared machine
  batch = (train_batch if kind == 'train' else eval_batch)(config)
  steps_to_time = {'': _build(kind, config, batch)}
  if baseline_grouped_conv is not None:
    baseline_config = ml_collections.ConfigDict(config.to_dict())
    baseline_config.model.grouped_conv = baseline_grouped_conv
    steps_to_time['baseline'] = _build(kind, baseline_config, batch)
  for index in range(warmup + steps):
    for timed in steps_to_time.values():
      timed.run(record=index >= warmup)
  dtype = config.precision.compute_dtype if kind == 'train' else config.precision.eval_compute_dtype
  size = matmul_size or default_matmul_size()
  peak = matmul_peak_flops(dtype, size)
  batch_size = config.train.batch_size if kind == 'train' else config.train.eval_batch_size
  report = {
      'benchmark': kind,
      'model': f'{config.model.name} {config.model.get("variant", "")}'.strip(),
      'grouped_conv': layers.resolve_grouped_conv(config.model.get('grouped_conv', 'auto')),
      'dtype': dtype,
      'resolution': config.data.train_resolution if kind == 'train' else config.data.eval_resolution,
      'batch_size': batch_size,
      'backend': jax.default_backend(),
      'device': jax.local_devices()[0].device_kind,
      'steps': steps,
      'warmup_steps': warmup,
      **steps_to_time[''].report(batch_size, peak),
      'peak_matmul_flops_per_s': peak,
      'peak_matmul_size': size,
  }
  if 'baseline' in steps_to_time:
    baseline = steps_to_time['baseline'].report(batch_size, peak)
    report['baseline'] = {'grouped_conv': layers.resolve_grouped_conv(baseline_grouped_conv), **baseline}
    report['speedup_vs_baseline'] = round(baseline['step_s_median'] / report['step_s_median'], 2)
  # ru_maxrss is in KiB on Linux.
  report['peak_host_memory_mib'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  report['load_average_1min'] = [round(load_at_start, 2), round(os.getloadavg()[0], 2)]
  return report
