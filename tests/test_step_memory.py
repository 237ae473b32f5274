"""The train step's memory report (`scripts.benchmark memory`) and the memory table built from it."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import nfnet as nfnet_configs
from scripts import memory_fit
from scripts import step_timing
from scripts import step_memory
from tests.helpers import REPO_ROOT

RESOLUTION = 32


def _config(remat: bool = False, batch: int = 4):
  config = step_timing.apply_overrides(nfnet_configs.get_config('tiny'), batch=batch, resolution=RESOLUTION,
                                          dtype='bfloat16', remat=remat)
  # Four blocks at the first stage's resolution, so that the blocks' activations outweigh the stem's.
  config.model.depths = (4, 1, 1, 1)
  config.model.widths = (64, 64, 64, 64)
  return config


def _run_memory(*args):
  return subprocess.run([sys.executable, '-m', 'scripts.benchmark', 'memory', '--config', 'configs/nfnet.py:tiny',
                         f'--resolution={RESOLUTION}', *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=300)


def test_batch_spec_is_the_pipelines_batch():
  config = _config(batch=2)
  real = step_timing.train_batch(config)
  spec = step_memory.train_batch_spec(config, 2)
  assert set(real) == set(spec)
  for key, value in real.items():
    assert (value.shape, value.dtype) == (spec[key].shape, spec[key].dtype), key


@pytest.mark.slow
def test_compiled_step_figures_add_up_without_allocating_the_state():
  config = _config(batch=4)
  figures = step_memory.memory_figures(step_memory.compile_train_step(config, 4))
  state = step_memory.abstract_train_state(step_memory.training_setup(config), config)
  state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
  batch_spec = step_memory.train_batch_spec(config, 4)
  batch_bytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in batch_spec.values())
  assert figures['argument_bytes'] == state_bytes + batch_bytes
  assert figures['aliased_bytes'] == state_bytes  # the new state reuses the donated one
  assert figures['temporary_bytes'] > 0
  assert figures['total_bytes'] == (figures['argument_bytes'] + figures['output_bytes'] - figures['aliased_bytes']
                                    + figures['temporary_bytes'])


@pytest.mark.slow
def test_accumulated_step_takes_the_whole_update_and_keeps_one_micro_batch_of_activations():
  config = _config(batch=8)
  plain = step_memory.memory_figures(step_memory.compile_train_step(config, 8))
  config.train.accumulation_steps = 4
  spec = step_memory.train_batch_spec(config, 2)
  assert spec['images'].shape == (1, 8, RESOLUTION, RESOLUTION, 3)  # 4 micro-batches of 2
  accumulated = step_memory.memory_figures(step_memory.compile_train_step(config, 2))
  assert accumulated['argument_bytes'] == plain['argument_bytes']  # the same state and batch come in
  assert accumulated['temporary_bytes'] < plain['temporary_bytes']


def test_remat_keeps_fewer_activations_per_example():
  plain = step_memory.saved_activations(_config(), 4)
  remat = step_memory.saved_activations(_config(remat=True), 4)
  assert 0 < remat['saved_activation_bytes_per_example'] < plain['saved_activation_bytes_per_example'] / 2
  assert remat['saved_activation_bytes'] < plain['saved_activation_bytes']
  # Linear in the batch beyond the batch-independent part.
  assert step_memory.saved_activation_bytes(_config(), 8) == plain['saved_activation_bytes'] + 4 * plain[
      'saved_activation_bytes_per_example']


def test_memory_command_prints_one_json_line():
  result = _run_memory('--batch=4', '--remat', '--nocompile')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert report['benchmark'] == 'memory' and report['per_device_batch'] == 4 and report['remat'] is True
  assert report['resolution'] == RESOLUTION and report['backend'] == 'cpu'
  assert 0 < report['saved_activation_bytes_per_example'] < report['saved_activation_bytes']
  for name in ('state', 'saved_activation'):
    assert report[f'{name}_bytes'] > 0
    assert report[f'{name}_gib'] == round(report[f'{name}_bytes'] / 2**30, 3)


def test_memory_command_refuses_a_bad_batch_in_one_line():
  result = _run_memory('--batch=0')
  assert result.returncode != 0 and result.stderr.startswith('error:') and result.stderr.count('\n') == 1


def test_fit_and_accumulation_steps():
  intercept, slope = memory_fit.fit_line([(16, 3 * 2**30 + 16 * 2**28), (64, 3 * 2**30 + 64 * 2**28)])
  assert (intercept, slope) == pytest.approx((3 * 2**30, 2**28))
  assert memory_fit.largest_batch(intercept, slope, 16 * 2**30) == 52
  assert memory_fit.largest_batch(intercept, slope, 2 * 2**30) == 0
  assert memory_fit.accumulation_steps(52, 1) == 128     # 4096 = 128 x 32, and 64 would not fit
  assert memory_fit.accumulation_steps(52, 64) == 2      # 64 per device = 2 x 32
  assert memory_fit.accumulation_steps(64, 64) == 1
  assert memory_fit.accumulation_steps(0, 8) is None
  with pytest.raises(ValueError, match='two or more'):
    memory_fit.fit_line([(16, 1), (16, 2)])


def test_table_estimates_remat_from_the_activations_it_no_longer_keeps():
  gib = 2**30
  records = [
      {'config': 'F0', 'remat': False, 'per_device_batch': 16, 'resolution': 192,
       'total_bytes': 3 * gib + 16 * gib // 4},
      {'config': 'F0', 'remat': False, 'per_device_batch': 64, 'resolution': 192,
       'total_bytes': 3 * gib + 64 * gib // 4},
      {'config': 'F0', 'remat': False, 'per_device_batch': 16, 'resolution': 192, 'state_bytes': gib,
       'saved_activation_bytes': 3 * gib, 'saved_activation_bytes_per_example': gib // 8},
      {'config': 'F0', 'remat': True, 'per_device_batch': 16, 'resolution': 192, 'state_bytes': gib,
       'saved_activation_bytes': gib, 'saved_activation_bytes_per_example': gib // 32},
  ]
  rows = memory_fit.table(records, ['F0'], [16.0], [1, 64]).splitlines()[2:]
  assert rows[0].split(' | ')[-1] == '52 (128/2) |'   # (16 - 3) GiB / 0.25 GiB per example
  # 1/8 - 1/32 GiB fewer per example: 0.15625 GiB, so (16 - 3) / 0.15625 = 83.2 examples.
  assert rows[1].split(' | ')[-1] == '83 (64/1) |' and '(estimate)' in rows[1]


def test_table_without_a_compile_estimates_from_the_trace():
  gib = 2**30
  records = [{'config': 'F6', 'remat': False, 'per_device_batch': 16, 'resolution': 448, 'state_bytes': 4 * gib,
              'saved_activation_bytes': 16 * gib // 2 + gib, 'saved_activation_bytes_per_example': gib // 2}]
  row = memory_fit.table(records, ['F6'], [40.0], [8]).splitlines()[2]
  # (40 - 4 - 1) GiB / 0.5 GiB per example = 70 examples; 512 per device = 8 x 64.
  assert row.endswith('| 5.00 + 0.5000 (trace estimate) | 70 (8) |')
