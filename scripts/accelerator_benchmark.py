"""The train-step benchmark at growing batch sizes, up to the largest that fits: the MFU check for an accelerator.

  python -m scripts.accelerator_benchmark --config configs/nfnet.py:F0 --dtype bfloat16 --resolution 192 \
      --batches 32,64,128,256,512,1024 --steps 10 [--out results.jsonl]

Each batch size runs `scripts.benchmark train` in a process of its own (an out-of-memory failure leaves no
state behind, and each run gets the whole device), in increasing order, and the sweep stops at the first
size that does not fit (XLA's RESOURCE_EXHAUSTED or an out-of-memory message). Every run's JSON line is
printed as it arrives (and appended to `--out`); the last line is a summary: the batch sizes that fitted, the
first that did not, and the run with the highest images/s with its MFU. `--config.x=value` overrides are
passed on to every run. Any other failure stops the sweep with that run's last error line.
"""
import json
import subprocess
import sys
from typing import Any

from absl import flags
from etils import epath

from nfnets import cli
from nfnets import files
from nfnets.errors import UserError
from scripts import step_benchmark

_CONFIG = cli.define_config_flag('The config whose train step is timed.',
                                   default=f'{cli.REPO_ROOT}/configs/nfnet.py:F0')
_BATCHES = flags.DEFINE_list('batches', ['32', '64', '128', '256', '512', '1024'],
                             'Batch sizes to try, in increasing order.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'Compute dtype.')
_RESOLUTION = flags.DEFINE_integer('resolution', None, "Image size; default: the config's train resolution.")
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per batch size.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_OUT = flags.DEFINE_string('out', None, 'Also append every JSON line to this file (local or gs://).')
_TIMEOUT = flags.DEFINE_integer('timeout_s', 900, 'Seconds one batch size may take.')


def run_command(batch: int) -> list[str]:
  """The `scripts.benchmark train` command line for one batch size, with this command's config and overrides."""
  command = [sys.executable, '-m', 'scripts.benchmark', 'train', f'--config={cli.config_spec()}',
             f'--batch={batch}', f'--dtype={_DTYPE.value}', f'--steps={_STEPS.value}', f'--warmup={_WARMUP.value}']
  if _RESOLUTION.value:
    command.append(f'--resolution={_RESOLUTION.value}')
  return command + [arg for arg in sys.argv[1:] if arg.startswith('--config.')]


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  sizes = step_benchmark.batch_sizes(_BATCHES.value)
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

  emit(step_benchmark.sweep_batch_sizes(sizes, run_one, emit))


if __name__ == '__main__':
  cli.run(main)
