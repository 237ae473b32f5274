"""The AGC ablation: clipping mode x batch size x learning rate, one training run after another.

Each run trains with `trainer.train_and_evaluate` in its own sub-workdir `<workdir>/<run name>` and, once
it ends, leaves `result.json` there. Rerunning the sweep skips runs that have a result and resumes the
others from their checkpoints, so an interrupted sweep picks up where it stopped. A run that diverges (the
trainer stops after too many non-finite steps, or the final accuracy is at chance) is a result, not a
crash. `write_tables` turns the results into `results.csv` and `results.md`. The workdir may be local or
remote (gs://): every path goes through `etils.epath`.
"""
import copy
import dataclasses
import json
import math
import time
from typing import Any, Callable, Optional, Sequence

from etils import epath
import ml_collections

import configs
from nfnets import files
from nfnets import trainer
from nfnets.errors import ConfigError
from nfnets.errors import TrainingError
from nfnets.studies import sweeps

MODES = ('none', 'global_norm', 'agc')
RESULT_FILE = 'result.json'
# A run whose final top-1 (raw and EMA) stays below this multiple of chance counts as diverged.
CHANCE_MARGIN = 2.0


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One point of the grid. `clipping` is the mode's threshold: AGC's lambda (config.optimizer.agc_lambda),
  global_norm's (config.optimizer.global_norm_threshold), and 0 for 'none'. It is the results' `clipping` column."""
  mode: str
  clipping: float
  batch_size: int
  learning_rate: float   # the config's base learning rate (scaled by batch_size / reference_batch_size)

  @property
  def name(self) -> str:
    return f'{self.mode}-lam{self.clipping:g}-bs{self.batch_size}-lr{self.learning_rate:g}'


def make_grid(modes: Sequence[str], lambdas: Sequence[float], batch_sizes: Sequence[int],
              learning_rates: Sequence[float], global_norm_threshold: float = 1.0) -> list[RunSpec]:
  """Every (learning rate, batch size, mode[, lambda]) combination, AGC once per lambda; checks the input."""
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    raise ConfigError(f'unknown clipping mode {unknown[0]!r}; use some of {", ".join(MODES)}')
  for label, values in (('modes', modes), ('batch sizes', batch_sizes), ('learning rates', learning_rates)):
    if not values:
      raise ConfigError(f'the grid needs at least one of {label}')
    if len(set(values)) != len(values):
      raise ConfigError(f'{label} repeat a value: {", ".join(map(str, values))}')
  if 'agc' in modes and not lambdas:
    raise ConfigError('mode agc needs at least one lambda (--lambdas)')
  if len(set(lambdas)) != len(lambdas):
    raise ConfigError(f'lambdas repeat a value: {", ".join(map(str, lambdas))}')
  for label, values in (('lambda', lambdas), ('batch size', batch_sizes), ('learning rate', learning_rates),
                        ('global-norm threshold', [global_norm_threshold])):
    bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    if bad:
      raise ConfigError(f'every {label} must be a positive number, got {bad[0]!r}')
  if any(int(b) != b for b in batch_sizes):
    raise ConfigError(f'batch sizes must be whole numbers, got {", ".join(map(str, batch_sizes))}')
  grid = []
  for learning_rate in learning_rates:
    for batch_size in batch_sizes:
      for mode in modes:
        clippings = {'agc': lambdas, 'global_norm': [global_norm_threshold], 'none': [0.0]}[mode]
        grid.extend(RunSpec(mode, float(c), int(batch_size), float(learning_rate)) for c in clippings)
  return grid


def run_config(base: ml_collections.ConfigDict, spec: RunSpec) -> ml_collections.ConfigDict:
  """`base` with the run's clipping, batch size and base learning rate."""
  config = copy.deepcopy(base)
  config.optimizer.clip_mode = spec.mode
  if spec.mode == 'agc':
    config.optimizer.agc_lambda = spec.clipping
  elif spec.mode == 'global_norm':
    config.optimizer.global_norm_threshold = spec.clipping
  config.train.batch_size = spec.batch_size
  config.optimizer.base_learning_rate = spec.learning_rate
  return config


def read_metrics(run_dir: str | epath.PathLike) -> list[dict[str, float]]:
  """The run's metrics.jsonl rows (empty if it has none yet)."""
  path = epath.Path(run_dir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _training_summary(rows: list[dict[str, float]], batch_size: int) -> dict[str, Optional[float]]:
  """Steps/s over the logged windows (compilation excluded by the trainer) and the last clipped fraction."""
  windows = [r['train/images_per_sec'] for r in rows if r.get('train/images_per_sec', 0) > 0]
  clipped = [r['train/agc_clipped_fraction'] for r in rows if 'train/agc_clipped_fraction' in r]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  return {
      # Each window holds the same number of steps: the rate over all of them is the harmonic mean.
      'steps_per_sec': len(windows) / sum(batch_size / w for w in windows) if windows else None,
      'agc_clipped_fraction': clipped[-1] if clipped else None,
      'final_train_loss': losses[-1] if losses else None,
      'steps': rows[-1]['step'] if rows else 0,
  }


def _json_safe(value: Any) -> Any:
  return None if isinstance(value, float) and not math.isfinite(value) else value


def run_one(config: ml_collections.ConfigDict, spec: RunSpec, run_dir: str | epath.PathLike,
            train_fn: Callable[..., dict[str, float]] = trainer.train_and_evaluate) -> Optional[dict[str, Any]]:
  """Trains one grid point (resuming its checkpoints) and records its result; None if it was preempted."""
  run_dir = epath.Path(run_dir)
  started = time.time()
  error = None
  try:
    final = train_fn(config, str(run_dir))
  except TrainingError as e:
    final, error = None, str(e).splitlines()[0]
  if final == {}:
    return None  # SIGTERM: checkpointed, to be resumed by the next sweep
  chance = 1.0 / config.model.num_classes
  summary = _training_summary(read_metrics(run_dir), spec.batch_size)
  top1 = final['top1'] if final else None
  ema_top1 = final['ema_top1'] if final else None
  if error:
    diverged, reason = True, error
  elif max(top1, ema_top1) < CHANCE_MARGIN * chance:
    diverged, reason = True, f'final top-1 {max(top1, ema_top1):.3f} near chance ({chance:.3f})'
  else:
    diverged, reason = False, ''
  result = {
      'name': spec.name, **dataclasses.asdict(spec),
      'peak_learning_rate': spec.learning_rate * spec.batch_size / config.optimizer.reference_batch_size,
      'top1': top1, 'ema_top1': ema_top1, 'diverged': diverged, 'reason': reason,
      **{k: _json_safe(v) for k, v in summary.items()},
      'wall_seconds': round(time.time() - started, 1),
      'config': json.loads(config.to_json()),
  }
  run_dir.mkdir(parents=True, exist_ok=True)
  files.write_atomic(run_dir / RESULT_FILE, json.dumps(result, indent=2))  # whole or not at all
  return result


def finished_result(config: ml_collections.ConfigDict, run_dir: str | epath.PathLike) -> Optional[dict[str, Any]]:
  """The recorded result of a finished run, None if there is none; refuses one made with another config."""
  path = epath.Path(run_dir) / RESULT_FILE
  if not path.exists():
    return None
  result = json.loads(path.read_text())
  if configs.upgrade(result['config']) != json.loads(config.to_json()):
    raise ConfigError(f'{run_dir} holds a finished run with a different config; use a new --workdir '
                      '(or the same config and overrides as before)')
  return result


def run_sweep(base: ml_collections.ConfigDict, grid: Sequence[RunSpec], workdir: str | epath.PathLike, *,
              say: Callable[[str], None] = print,
              train_fn: Callable[..., dict[str, float]] = trainer.train_and_evaluate) -> list[dict[str, Any]]:
  """Runs the grid in order, skipping finished runs; rewrites the tables after each run.

  Returns the results of all runs, or of those done before a preemption (SIGTERM) stopped the sweep.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  results = []
  for index, spec in enumerate(grid, 1):
    config = run_config(base, spec)
    run_dir = workdir / spec.name
    result = finished_result(config, run_dir)
    if result is not None:
      say(f'[{index}/{len(grid)}] {spec.name}: finished before, skipped')
    else:
      say(f'[{index}/{len(grid)}] {spec.name}: training in {run_dir}')
      result = run_one(config, spec, run_dir, train_fn)
      sweeps.release_compiled_programs()  # every run compiles its own
      if result is None:
        say(f'stopped by SIGTERM; rerun the same command to resume at {spec.name}')
        break
    results.append(result)
    write_tables(results, workdir)
  return results


CSV_COLUMNS = ('name', 'mode', 'clipping', 'batch_size', 'learning_rate', 'peak_learning_rate', 'top1',
               'ema_top1', 'diverged', 'agc_clipped_fraction', 'final_train_loss', 'steps', 'steps_per_sec',
               'wall_seconds', 'reason')


def _percent(value: Optional[float]) -> str:
  return '–' if value is None else f'{100 * value:.1f}'


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
  header = ('clipping', 'λ', 'batch', 'base lr (peak)', 'top-1 %', 'EMA top-1 %', 'diverged', 'clipped units %',
            'steps/s')
  rows = []
  for r in results:
    clipping = {'agc': f'{r["clipping"]:g}', 'global_norm': f'norm ≤ {r["clipping"]:g}'}.get(r['mode'], '–')
    speed = '–' if r['steps_per_sec'] is None else f'{r["steps_per_sec"]:.1f}'
    rows.append((r['mode'], clipping, str(r['batch_size']),
                 f'{r["learning_rate"]:g} ({r["peak_learning_rate"]:.3g})', _percent(r['top1']),
                 _percent(r['ema_top1']), 'yes' if r['diverged'] else 'no', _percent(r['agc_clipped_fraction']),
                 speed))
  return sweeps.markdown_table(header, rows)


def write_tables(results: Sequence[dict[str, Any]], workdir: str | epath.PathLike) -> None:
  """`results.csv` (every number) and `results.md` (the table for a README)."""
  files.write_atomic(epath.Path(workdir) / 'results.csv', sweeps.csv_text(results, CSV_COLUMNS))
  files.write_atomic(epath.Path(workdir) / 'results.md', markdown_table(results))
