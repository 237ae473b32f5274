"""The memory table of docs/memory.md: the per-device micro-batch that fits a device, and the accumulation it needs.

  python -m scripts.memory_table --variants F0,F3,F6 --batches 16,64 --out /tmp/memory.jsonl

For each NFNet variant, at its recipe's train resolution in bfloat16 with grouped convolutions as accelerators
run them ('native'), this runs `scripts.benchmark memory` (one process per measurement):
  * with `--nocompile`, with and without rematerialisation, at the first of `--batches`: the state's size and
    the activations kept for the backward pass (tracing only, fast);
  * compiled without rematerialisation at each of `--batches`: XLA's total per device.
The step's memory is affine in the micro-batch (the state and its gradient-sized buffers, plus activations
per example), so a line through XLA's totals gives the largest micro-batch that fits each of
`--capacities_gib`. With rematerialisation the line's slope is lowered by the activations per example that
remat no longer keeps: an estimate, because XLA CPU undoes remat in its compile (see scripts/step_memory.py),
so its own totals cannot show the saving. From each micro-batch, the accumulation steps that reach the
recipe's batch on each of `--devices` device counts: the fewest k such that the recipe's batch splits into
`devices x k` micro-batches that fit. Measurements already in `--out` are reused, so an interrupted run
resumes; `--skip_compile VARIANTS` leaves out the compiles of variants too slow to compile on this machine:
their rows are trace estimates, the state plus the activations kept for the backward pass (for F0, whose step
was compiled, the two agree within a few percent). The last output is the Markdown table.
"""
import json
import subprocess
from typing import Sequence

from absl import flags
from etils import epath

from nfnets import cli
from nfnets import files
from nfnets.errors import ConfigError
from nfnets.errors import UserError
from scripts.memory_fit import matches, measure_command, table

_VARIANTS = flags.DEFINE_list('variants', ['F0', 'F3', 'F6'], 'NFNet variants (configs/nfnet.py arguments).')
_BATCHES = flags.DEFINE_list('batches', ['16', '64'], 'Per-device micro-batches to compile (at least two).')
_SKIP_COMPILE = flags.DEFINE_list('skip_compile', [], 'Variants whose step is not compiled (activations only).')
_CAPACITIES = flags.DEFINE_list('capacities_gib', ['16', '40', '80'], 'Device memory sizes, GiB.')
_DEVICES = flags.DEFINE_list('devices', ['1', '4', '8', '64'], 'Device counts for the accumulation steps.')
_OUT = cli.define_out_flag('JSON lines of the measurements, reused and rewritten (required).')
_TIMEOUT = flags.DEFINE_integer('timeout_s', 7200, 'Seconds one measurement may take.')

def _integers(name: str, values: Sequence[str], minimum: int) -> list[int]:
  try:
    numbers = [int(v) for v in values]
  except ValueError:
    raise ConfigError(f'--{name} must be integers, got {",".join(values)}') from None
  if not numbers or min(numbers) < minimum:
    raise ConfigError(f'--{name} must be integers >= {minimum}, got {",".join(values)}')
  return numbers


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _OUT.value:
    raise ConfigError('--out is required (the measurements are kept there)')
  batches = sorted(set(_integers('batches', _BATCHES.value, 1)))
  if len(batches) < 2:
    raise ConfigError(f'--batches needs two or more different sizes to fit a line, got {",".join(_BATCHES.value)}')
  device_counts = _integers('devices', _DEVICES.value, 1)
  try:
    capacities = [float(v) for v in _CAPACITIES.value]
  except ValueError:
    raise ConfigError(f'--capacities_gib must be numbers, got {",".join(_CAPACITIES.value)}') from None
  out = epath.Path(_OUT.value)
  records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
  # The fast traces of every variant first, then the slow compiles.
  wanted = [(v, batches[0], remat, False) for v in _VARIANTS.value for remat in (False, True)]
  wanted += [(v, b, False, True) for v in _VARIANTS.value if v not in _SKIP_COMPILE.value for b in batches]
  for variant, batch, remat, compile_step in wanted:
    if any(matches(r, variant, batch, remat, compile_step) for r in records):
      continue
    what = f'{variant} remat={remat} batch {batch}'
    try:
      result = subprocess.run(measure_command(variant, batch, remat, compile_step), cwd=cli.REPO_ROOT,
                              capture_output=True, text=True, timeout=_TIMEOUT.value)
    except subprocess.TimeoutExpired:
      raise UserError(f'{what} ran past --timeout_s={_TIMEOUT.value}') from None
    if result.returncode != 0:
      last = (result.stderr.strip().splitlines() or ['(no output)'])[-1]
      raise UserError(f'{what} failed: {last}')
    line = result.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    records.append(json.loads(line))
    # Rewritten whole after each measurement (object stores cannot append), so an interrupted table keeps
    # what it measured.
    files.write_atomic(out, ''.join(json.dumps(r) + '\n' for r in records))
  print(table(records, _VARIANTS.value, capacities, device_counts))


if __name__ == '__main__':
  cli.run(main)
