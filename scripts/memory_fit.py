"""The memory table's arithmetic (`scripts.memory_table` is its command): a line through the measured per-device
totals, the largest micro-batch that fits a device, the accumulation steps that reach the recipe's batch, and the
Markdown table. Flag-free, so tests and other commands import it without defining absl flags twice.
"""
import math
import sys
from typing import Any, Optional, Sequence

from nfnets import cli
from nfnets.errors import ConfigError

# The recipe's batch (configs/common.py), the same for every NFNet variant.
RECIPE_BATCH = 4096
GIB = 2**30


def measure_command(variant: str, batch: int, remat: bool, compile_step: bool) -> list[str]:
  return [sys.executable, '-m', 'scripts.benchmark', 'memory',
          f'--config={cli.REPO_ROOT}/configs/nfnet.py:{variant}',
          f'--batch={batch}', '--dtype=bfloat16', f'--remat={remat}', f'--compile={compile_step}',
          '--config.model.grouped_conv=native']


def matches(record: dict[str, Any], variant: str, batch: int, remat: bool, compile_step: bool) -> bool:
  return (record['config'] == variant and record['per_device_batch'] == batch and record['remat'] == remat
          and ('total_bytes' in record) == compile_step)


def fit_line(points: Sequence[tuple[int, int]]) -> tuple[float, float]:
  """Least-squares (intercept, slope) of total bytes against micro-batch."""
  if len({b for b, _ in points}) < 2:
    raise ConfigError('need measurements at two or more micro-batches to fit a line')
  n = len(points)
  mean_b = sum(b for b, _ in points) / n
  mean_m = sum(m for _, m in points) / n
  slope = (sum((b - mean_b) * (m - mean_m) for b, m in points)
           / sum((b - mean_b) ** 2 for b, _ in points))
  return mean_m - slope * mean_b, slope


def largest_batch(intercept: float, slope: float, capacity_bytes: float) -> int:
  """The largest micro-batch whose fitted total fits `capacity_bytes` (0: not even one example)."""
  return max(0, math.floor((capacity_bytes - intercept) / slope))


def accumulation_steps(micro_batch: int, devices: int, recipe_batch: int = RECIPE_BATCH) -> Optional[int]:
  """The fewest k with `recipe_batch` = devices x k x m for an integer m <= `micro_batch`; None if none."""
  if micro_batch < 1 or recipe_batch % devices:
    return None
  per_device = recipe_batch // devices
  return next(k for k in range(1, per_device + 1) if per_device % k == 0 and per_device // k <= micro_batch)


def _cell(intercept: float, slope: float, capacity_gib: float, device_counts: Sequence[int]) -> str:
  fits = largest_batch(intercept, slope, capacity_gib * GIB)
  steps = [accumulation_steps(fits, d) for d in device_counts]
  return f'{fits} ({"/".join("-" if k is None else str(k) for k in steps)})'


def table(records: Sequence[dict[str, Any]], variants: Sequence[str], capacities: Sequence[float],
          device_counts: Sequence[int]) -> str:
  """The Markdown table: per variant and remat, the state, the activations per example, the total's line
  (XLA's fit where compiled, else the trace estimate) and the micro-batch (and accumulation steps) that fits
  each capacity."""
  header = ['model', 'resolution', 'remat', 'state GiB', 'activations GiB / example',
            'total GiB: fixed + per example']
  header += [f'{c:g} GiB: micro-batch (k on {"/".join(map(str, device_counts))} devices)' for c in capacities]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for variant in variants:
    traced = {r['remat']: r for r in records if r['config'] == variant and 'state_bytes' in r}
    compiled = [r for r in records if r['config'] == variant and 'total_bytes' in r and not r['remat']]
    line = fit_line([(r['per_device_batch'], r['total_bytes']) for r in compiled]) if len(
        {r['per_device_batch'] for r in compiled}) > 1 else None
    per_example = {remat: r['saved_activation_bytes_per_example'] for remat, r in traced.items()}
    for remat in (False, True):
      if remat not in traced:
        continue
      row = [variant, str(traced[remat]['resolution']), 'yes' if remat else 'no',
             f'{traced[remat]["state_bytes"] / GIB:.2f}', f'{per_example[remat] / GIB:.4f}']
      if line is None:  # not compiled: the state plus the kept activations, from the trace alone
        record = traced[remat]
        slope = per_example[remat]
        intercept = record['state_bytes'] + record['saved_activation_bytes'] - record['per_device_batch'] * slope
        note = ' (trace estimate)'
      else:
        intercept, slope = line
        note = ''
        if remat:  # remat keeps fewer activations per example; XLA CPU cannot show it (module docstring)
          slope -= per_example[False] - per_example[True]
          note = ' (estimate)'
      row.append(f'{intercept / GIB:.2f} + {slope / GIB:.4f}{note}')
      row += [_cell(intercept, slope, c, device_counts) for c in capacities]
      lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)
