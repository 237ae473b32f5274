"""The batch-size sweep of the accelerator benchmark: stops at the first size that does not fit."""
import json
import subprocess
import sys

import pytest

from nfnets.errors import UserError
from scripts import accelerator_benchmark
from tests.helpers import REPO_ROOT


def _runner(outcomes):
  """A stand-in for one benchmark process per batch size: a record, or a failure's stderr."""

  def run_one(batch):
    outcome = outcomes[batch]
    if isinstance(outcome, str):
      return subprocess.CompletedProcess([], 1, '', f'Traceback...\n{outcome}\n')
    record = dict(batch_size=batch, dtype='bfloat16', resolution=192, device='H200', step_s_median=1.0,
                  images_per_s=outcome, mfu=outcome / 1000, achieved_flops_per_s=1.0, peak_matmul_flops_per_s=2.0,
                  compile_s=3.0)
    return subprocess.CompletedProcess([], 0, 'compiling...\n' + json.dumps(record) + '\n', '')

  return run_one


def test_the_sweep_stops_at_the_first_batch_that_does_not_fit_and_reports_the_fastest():
  emitted = []
  outcomes = {64: 500.0, 128: 620.0, 256: 610.0,
              512: 'jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 1.2GiB',
              1024: 'never run'}
  result = accelerator_benchmark.sweep_batch_sizes([64, 128, 256, 512, 1024], _runner(outcomes), emitted.append)
  assert [r['batch_size'] for r in emitted] == [64, 128, 256]
  assert result['batches_fitted'] == [64, 128, 256] and result['first_batch_not_fitting'] == 512
  assert result['best']['batch_size'] == 128 and result['best']['mfu'] == pytest.approx(0.62)


def test_a_failure_other_than_memory_stops_the_sweep_with_its_error_line():
  with pytest.raises(UserError, match='batch 128 failed: ValueError: bad shape'):
    accelerator_benchmark.sweep_batch_sizes([64, 128, 256], _runner({64: 1.0, 128: 'ValueError: bad shape'}),
                                            lambda r: None)


@pytest.mark.slow
def test_the_command_runs_the_real_benchmark_per_batch_and_writes_its_lines(tmp_path):
  out = tmp_path / 'mfu.jsonl'
  result = subprocess.run(
      [sys.executable, '-m', 'scripts.accelerator_benchmark', '--config', 'configs/nfnet.py:tiny', '--batches=2',
       '--steps=1', '--warmup=0', '--dtype=float32', '--config.model.depths=(1,1,1,1)', f'--out={out}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  run, summary = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert run['benchmark'] == 'train' and run['batch_size'] == 2 and run['dtype'] == 'float32'
  assert run['config'] == 'tiny' and run['mfu'] > 0
  assert (run['steps'], run['warmup_steps']) == (1, 0)  # the step flags reach every run
  assert summary['batches_fitted'] == [2] and summary['best']['batch_size'] == 2
  assert [json.loads(line) for line in out.read_text().splitlines()] == [run, summary]


def test_bad_batch_lists_fail_with_one_line():
  result = subprocess.run([sys.executable, '-m', 'scripts.accelerator_benchmark', '--batches=64,32'],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and result.stderr.count('\n') == 1, result.stderr
  assert 'positive and increasing' in result.stderr
