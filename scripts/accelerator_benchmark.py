"""The train-step benchmark at growing batch sizes, up to the largest that fits: the MFU check for an accelerator.

  python -m scripts.accelerator_benchmark --config configs/nfnet.py:F0 --dtype bfloat16 --resolution 192 \
      --batches 32,64,128,256,512,1024 --steps 10 --warmup 2 [--out results.jsonl]

Each batch size runs `scripts.benchmark train` in a process of its own (an out-of-memory failure leaves no
state behind, and each run gets the whole device), in increasing order, and the sweep stops at the first
size that does not fit (XLA's RESOURCE_EXHAUSTED or an out-of-memory message). Every run's JSON line is
printed as it arrives (and appended to `--out`); the last line is a summary: the batch sizes that fitted, the
first that did not, and the run with the highest images/s with its MFU. The step flags (`--dtype`,
`--resolution`, `--steps`, `--warmup`, `--remat`, `--baseline`, `--matmul_size`: scripts/step_flags.py, the
same as `scripts.benchmark`'s) and `--config.x=value` overrides are passed on to every run. Any other failure
stops the sweep with that run's last error line.
"""
import json
import subprocess
import sys
from typing import Any, Callable, Optional, Sequence

from absl import flags
from etils import epath

from nfnets import cli
from nfnets import files
from nfnets.errors import ConfigError
from nfnets.errors import UserError
from scripts import step_flags

_CONFIG = cli.define_config_flag('The config whose train step is timed.',
                                default=f'{cli.REPO_ROOT}/configs/nfnet.py:F0')
_BATCHES = flags.DEFINE_list('batches', ['32', '64', '128', '256', '512', '1024'],
                             'Batch sizes to try, in increasing order.')
_OUT = cli.define_out_flag('Also append every JSON line to this file (local or gs://).')
_TIMEOUT = flags.DEFINE_integer('timeout_s', 900, 'Seconds one batch size may take.')

# What a run that did not fit prints: XLA's status, or an allocator's message.
OUT_OF_MEMORY_MARKERS = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory', 'OOM')


def batch_sizes(values: Sequence[str]) -> list[int]:
  try:
    sizes = [int(v) for v in values]
  except ValueError:
    raise ConfigError(f'--batches must be integers, got {",".join(values)}') from None
  if not sizes or any(b < 1 for b in sizes) or sizes != sorted(set(sizes)):
    raise ConfigError(f'--batches must be positive and increasing, got {",".join(values)}')
  return sizes


def sweep_summary(fitted: list[dict[str, Any]], too_large: Optional[int]) -> dict[str, Any]:
  best = max(fitted, key=lambda r: r['images_per_s']) if fitted else None
  return {
      'summary': 'accelerator_benchmark',
      'batches_fitted': [r['batch_size'] for r in fitted],
      'first_batch_not_fitting': too_large,
      'best': None if best is None else {k: best[k] for k in (
          'batch_size', 'dtype', 'resolution', 'device', 'step_s_median', 'images_per_s', 'mfu',
          'achieved_flops_per_s', 'peak_matmul_flops_per_s', 'compile_s')},
  }


def sweep_batch_sizes(sizes: Sequence[int], run_one: Callable[[int], subprocess.CompletedProcess],
                      emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """Runs `run_one` for each batch size until one does not fit; emits each run's record, returns the summary."""
  fitted, too_large = [], None
  for batch in sizes:
    result = run_one(batch)
    if result.returncode != 0:
      if any(marker in result.stderr for marker in OUT_OF_MEMORY_MARKERS):
        too_large = batch
        break
      last = (result.stderr.strip().splitlines() or ['(no output)'])[-1]
      raise UserError(f'batch {batch} failed: {last}')
    record = json.loads(result.stdout.strip().splitlines()[-1])
    fitted.append(record)
    emit(record)
  return sweep_summary(fitted, too_large)


def run_command(batch: int) -> list[str]:
  """The `scripts.benchmark train` command line for one batch size, with this command's config, step flags and
  overrides."""
  command = [sys.executable, '-m', 'scripts.benchmark', 'train', f'--config={cli.config_spec()}', f'--batch={batch}']
  return command + step_flags.per_run_args() + [arg for arg in sys.argv[1:] if arg.startswith('--config.')]


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if step_flags.BATCH.present:
    raise ConfigError('--batch: the sweep takes its batch sizes from --batches')
  sizes = batch_sizes(_BATCHES.value)
  step_flags.check()  # refused here once, rather than by every run
  _CONFIG.value  # pylint: disable=pointless-statement  (a config that fails to load is refused before any run)
  out = epath.Path(_OUT.value) if _OUT.value else None
  written = out.read_text() if out is not None and out.exists() else ''

  def emit(record: dict[str, Any]) -> None:
    nonlocal written
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:  # object stores cannot append: the file is rewritten whole, as metrics.jsonl is
      written += line + '\n'
      files.write_atomic(out, written)

  def run_one(batch: int) -> subprocess.CompletedProcess:
    try:
      return subprocess.run(run_command(batch), cwd=cli.REPO_ROOT, capture_output=True, text=True,
                            timeout=_TIMEOUT.value)
    except subprocess.TimeoutExpired:
      raise UserError(f'batch {batch} ran past --timeout_s={_TIMEOUT.value}') from None

  emit(sweep_batch_sizes(sizes, run_one, emit))


if __name__ == '__main__':
  cli.run(main)
