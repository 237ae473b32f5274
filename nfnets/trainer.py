"""`train_and_evaluate(config, workdir)`: the training loop around the pure step.

config -> data -> model -> loss -> optimizer -> checkpoint: this module wires them together, runs the
pmapped step over the local devices, logs, checkpoints (also on preemption, agreed by all hosts), resumes
from the workdir, and evaluates raw and EMA weights. The workdir may be local or remote (`gs://...`): every
path goes through `etils.epath`.
"""
import json
import math
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import haiku as hk
import jax
import ml_collections
import optax
from etils import epath

from nfnets import accumulation
from nfnets import checkpoint
from nfnets import distributed
from nfnets import durations
from nfnets import evaluate
from nfnets import files
from nfnets import metrics_writer
from nfnets import models
from nfnets import optim
from nfnets import preemption
from nfnets import train_state as train_state_lib
from nfnets import train_step as train_step_lib
from nfnets.data import device_prefetch
from nfnets.data import pipeline
from nfnets.data import sources
from nfnets.errors import ConfigError
from nfnets.errors import TrainingError

# Parts of the config that must match for a workdir's checkpoints to be resumed.
_RESUME_KEYS = ('seed', 'model', 'data', 'train.batch_size')
# The step's metrics that say whether and why its update was skipped, and the run's cumulative skip counts.
_SKIP_FLAGS = ('finite', 'nonfinite_streak', 'overflow', 'loss_scale')
_SKIP_COUNTS = ('skipped_overflow', 'skipped_nonfinite')


class TrainingSetup(NamedTuple):
  """Everything the loop runs, built from the config alone (no data is read, nothing is compiled)."""
  forward: hk.TransformedWithState
  optimizer: optax.GradientTransformation
  train_step: Callable[..., Any]   # per-device; pmap it over distributed.AXIS_NAME
  total_steps: int


def loss_scale_period(precision_config: ml_collections.ConfigDict) -> Optional[int]:
  """The dynamic loss scale's growth period for float16 compute (None: no loss scaling), checking the
  loss-scaling fields."""
  if precision_config.compute_dtype != 'float16':
    return None
  initial = precision_config.get('initial_loss_scale', train_state_lib.DEFAULT_INITIAL_LOSS_SCALE)
  period = precision_config.get('loss_scale_period', 2000)
  if not (initial >= 1 and math.isfinite(initial)):
    raise ConfigError(f'compute_dtype float16 needs config.precision.initial_loss_scale >= 1, got {initial}')
  if period < 1:
    raise ConfigError(f'compute_dtype float16 needs config.precision.loss_scale_period >= 1, got {period}')
  return period


def setup_training(config: ml_collections.ConfigDict, num_train_examples: int,
                   num_devices: Optional[int] = None) -> TrainingSetup:
  """config -> model, optimizer and per-device step, exactly as `train_and_evaluate` uses them.

  `num_devices` (default: every device of every host) only checks that the batch splits over them and
  the accumulation steps; the step itself is the same for any number.
  """
  layout = accumulation.batch_layout(config.train, jax.device_count() if num_devices is None else num_devices)
  scale_period = loss_scale_period(config.precision)
  total_steps = durations.total_steps(config.train, num_train_examples)
  forward = models.make_forward(config.model, config.precision.compute_dtype)
  schedule_args = dict(batch_size=config.train.batch_size, examples_per_epoch=num_train_examples,
                       total_steps=total_steps)
  # Fine-tuning with a frozen backbone (configs/finetune.py) trains the family's classifier alone.
  classifier = models.get_family(config.model.name).classifier_module
  frozen = config.get('finetune') is not None and config.finetune.freeze_backbone
  optimizer = optim.build_optimizer(config.optimizer, **schedule_args, classifier_module=classifier,
                                    trainable_module=classifier if frozen else None)
  learning_rate_fn = optim.learning_rate_schedule(config.optimizer, **schedule_args)
  step = train_step_lib.make_train_step(forward, optimizer, learning_rate_fn,
                                        label_smoothing=config.loss.label_smoothing,
                                        ema_decay=config.optimizer.ema_decay,
                                        uses_grad_fn=optim.needs_grad_fn(config.optimizer),
                                        accumulation_steps=layout.accumulation_steps,
                                        loss_scale_period=scale_period)
  return TrainingSetup(forward, optimizer, step, total_steps)


def pmap_train_step(setup: TrainingSetup, devices: Optional[Sequence[jax.Device]] = None) -> Callable[..., Any]:
  """The train step as the loop runs it: pmapped over `devices` (default: all local), the state donated
  off CPU. `(replicated_state, batch) -> (replicated_state, metrics)`."""
  return jax.pmap(setup.train_step, axis_name=distributed.AXIS_NAME, devices=devices,
                  donate_argnums=() if jax.default_backend() == 'cpu' else (0,))


def pmap_eval_step(config: ml_collections.ConfigDict,
                   devices: Optional[Sequence[jax.Device]] = None) -> Callable[..., Any]:
  """The loop's evaluation step, in `config.precision.eval_compute_dtype`, pmapped over `devices`:
  `(replicated weight sets, batch) -> summed hit counts`."""
  eval_forward = models.make_forward(config.model, config.precision.eval_compute_dtype)
  return jax.pmap(train_step_lib.make_eval_step(eval_forward), axis_name=distributed.AXIS_NAME,
                  devices=devices)


def _config_entry(config: dict, dotted: str) -> Any:
  for key in dotted.split('.'):
    config = config.get(key) if isinstance(config, dict) else None
  return config


def _check_workdir(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Refuses a workdir whose run was started with an incompatible config (reads only)."""
  path = workdir / 'config.json'
  if path.exists():
    previous = json.loads(path.read_text())
    current = json.loads(config.to_json())
    for run_config in (previous, current):
      for key in models.EXECUTION_ONLY_KEYS:
        run_config.get('model', {}).pop(key, None)
    for key in _RESUME_KEYS:
      if _config_entry(previous, key) != _config_entry(current, key):
        raise ConfigError(f'{workdir} holds a run with a different `{key}`; use a new --workdir '
                          f'(or the same config) so its checkpoints are not mixed with this run')


def _write_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """config.json, from the primary host only and atomically, so no host ever reads a half-written file."""
  if distributed.is_primary_host():
    workdir.mkdir(parents=True, exist_ok=True)
    files.write_atomic(workdir / 'config.json', config.to_json(indent=2))


def _format_eta(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *,
                       stop_after_step: Optional[int] = None) -> dict[str, float]:
  """Trains (resuming from `workdir` if it holds checkpoints) and returns the final eval results.

  Args:
    config: the experiment config (`configs/nfnet.py`).
    workdir: checkpoints, config.json, metrics.jsonl and TensorBoard files go here (local or e.g. gs://).
    stop_after_step: behave as if preempted once this step is reached: checkpoint and return an empty
      dict. For tests and for splitting a run into chunks on a scheduler.
  """
  primary = distributed.is_primary_host()
  say = print if primary else (lambda *a, **k: None)

  workdir = checkpoint.absolute(workdir)
  info = sources.dataset_info(config.data)
  if info.num_classes != config.model.num_classes:
    raise ConfigError(f'dataset {config.data.name!r} has {info.num_classes} classes but '
                     f'config.model.num_classes is {config.model.num_classes}')
  num_train_examples = len(sources.get_source(config.data, config.data.train_split))
  _check_workdir(config, workdir)
  setup = setup_training(config, num_train_examples)
  total_steps = setup.total_steps
  train_iter = pipeline.make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                            seed=config.seed, num_classes=info.num_classes,
                                            accumulation_steps=config.train.get('accumulation_steps', 1))
  if config.data.device_prefetch > 0:
    train_iter = device_prefetch.DevicePrefetch(train_iter, config.data.device_prefetch,
                                                distributed.AXIS_NAME)

  # Nothing is written before the data, the config and any checkpoint to start from have proven usable.
  new_checkpointer = lambda: checkpoint.TrainingCheckpointer(
      workdir / 'checkpoints', save_every=config.train.checkpoint_every_steps, keep=config.train.keep_checkpoints)
  checkpointer = new_checkpointer() if (workdir / 'checkpoints').exists() else None
  state, origin = train_state_lib.create_train_state(setup, config, checkpointer=checkpointer,
                                                     data_iterator=train_iter)
  _write_config(config, workdir)
  checkpointer = checkpointer or new_checkpointer()
  say(f'{origin} ({workdir})')
  meta = {'config': json.loads(config.to_json()), 'model': config.model.to_dict()}

  p_train_step = pmap_train_step(setup)
  p_eval_step = pmap_eval_step(config)

  def run_eval(replicated_state) -> dict[str, float]:
    eval_iter = pipeline.make_eval_iterator(config.data, global_batch_size=config.train.eval_batch_size)
    return evaluate.evaluate(p_eval_step, train_step_lib.eval_weight_sets(replicated_state), eval_iter)

  writer = metrics_writer.MetricsWriter(workdir, enabled=primary)
  step = int(state.step)
  replicated = distributed.replicate(state, distributed.AXIS_NAME)
  layout = accumulation.batch_layout(config.train, jax.device_count())
  accumulating = (f' as {layout.accumulation_steps} micro-batches of {layout.micro_batch} per device'
                  if layout.accumulation_steps > 1 else '')
  say(f'training {config.model.name} {config.model.variant} on {config.data.name} for {total_steps} steps '
      f'({num_train_examples} examples per epoch, batch {config.train.batch_size}{accumulating}, '
      f'{jax.local_device_count()} local device(s), {jax.process_count()} host(s))')

  def save(force: bool = False) -> None:
    if checkpointer.wants(step, force):  # copying the state off the devices is not free: only when saving
      checkpointer.save(distributed.unreplicate(replicated), train_iter, meta, force=force)

  # Each step's skip flags stay on the devices until the loop reads its metrics anyway (logging) or is
  # about to write or evaluate the state, so the host never waits on a step just to check it.
  unchecked: list[tuple[int, dict[str, jax.Array]]] = []

  def check_skips() -> None:
    flags = jax.device_get([step_flags for _, step_flags in unchecked])
    steps = [at_step for at_step, _ in unchecked]
    unchecked.clear()
    for at_step, step_flags in zip(steps, flags):
      if 'overflow' in step_flags and step_flags['overflow'][0] > 0:
        say(f'step {at_step}: float16 gradients overflowed at loss scale {step_flags["loss_scale"][0]:g}; '
            f'update skipped and the scale halved', flush=True)
        continue
      streak = int(step_flags['nonfinite_streak'][0])
      if step_flags['finite'][0] > 0 or streak == 0:
        continue
      say(f'step {at_step}: non-finite loss or gradient, update skipped ({streak} in a row)', flush=True)
      if streak >= config.train.max_consecutive_nonfinite:
        raise TrainingError(
            f'{streak} consecutive non-finite losses or gradients at step {at_step}; stopped. '
            f'The last good checkpoint (step {checkpointer.latest_step()}) is intact')

  def skipped_so_far(source) -> dict[str, int]:
    """The cumulative skip counts metrics.jsonl carries on every row, from a step's metrics or the state."""
    counts = jax.device_get({name: source[name] if isinstance(source, dict) else getattr(source, name)
                             for name in _SKIP_COUNTS})
    return {f'skipped_updates/{name[len("skipped_"):]}': int(counts[name][0]) for name in _SKIP_COUNTS}

  def evaluating(at_step: int) -> bool:
    return config.train.eval_every_steps > 0 and at_step % config.train.eval_every_steps == 0

  results: dict[str, float] = {}
  try:
    with preemption.Watcher() as preempted:
      window_start, window_steps = time.time(), 0
      first_step = True
      while step < total_steps:
        replicated, metrics = p_train_step(replicated, next(train_iter))
        step += 1
        window_steps += 1
        unchecked.append((step, {k: metrics[k] for k in _SKIP_FLAGS if k in metrics}))
        if first_step:
          # Keep the first step's compilation out of the throughput and ETA.
          jax.block_until_ready(metrics)
          window_start, window_steps, first_step = time.time(), 0, False
        stopping = preempted.reached(step) or step == stop_after_step
        log_now = step % config.train.log_every_steps == 0 or step == total_steps
        if log_now:
          skipped = skipped_so_far(metrics)
          metrics = {k: float(v[0]) for k, v in jax.device_get(metrics).items() if k not in _SKIP_COUNTS}
          elapsed = time.time() - window_start
          metrics['images_per_sec'] = window_steps * config.train.batch_size / max(elapsed, 1e-9)
          writer.write(step, metrics, prefix='train/', unprefixed=skipped)
          eta = (total_steps - step) * elapsed / max(window_steps, 1)
          say(f'step {step}/{total_steps} | loss {metrics["loss"]:.4f} | top-1 {metrics["top1_acc"]:.3f} '
              f'| lr {metrics["learning_rate"]:.4g} | {metrics["images_per_sec"]:.0f} img/s '
              f'| ETA {_format_eta(eta)}', flush=True)
          window_start, window_steps = time.time(), 0
        # After the log line, which shows this step's metrics whatever they are.
        if log_now or stopping or checkpointer.wants(step) or evaluating(step):
          check_skips()
        if stopping:
          save(force=True)
          say(f'checkpointed step {step} and stopped (preemption); rerun the same command to resume')
          return results
        save()
        if evaluating(step):
          writer.write(step, run_eval(replicated), prefix='eval/', unprefixed=skipped_so_far(replicated))
      check_skips()
    save(force=True)
    results = run_eval(replicated)
    writer.write(step, results, prefix='eval/', unprefixed=skipped_so_far(replicated))
  finally:
    if hasattr(train_iter, 'close'):
      train_iter.close()  # ends grain's worker processes and frees their shared memory
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.close()
  say(f'final: step {step} | {config.data.eval_split} top-1 {100 * results["top1"]:.2f}% '
      f'(EMA {100 * results["ema_top1"]:.2f}%) | top-5 {100 * results["top5"]:.2f}% '
      f'(EMA {100 * results["ema_top5"]:.2f}%) | {int(results["num_examples"])} examples')
  return results
