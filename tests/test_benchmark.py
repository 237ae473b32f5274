"""Tests for scripts.benchmark: the input sub-command in a tiny mode, the train and eval step timings."""
import json
import subprocess
import sys
import types

import numpy as np
import pytest

from scripts import benchmark
from tests import tiny_setup
from tests.helpers import REPO_ROOT


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'scripts.benchmark', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)


def _refusals(*command_lines):
  """Each command line's (exit status, stderr), the commands run side by side (each pays an import of JAX)."""
  processes = [subprocess.Popen([sys.executable, '-m', 'scripts.benchmark', *args], cwd=REPO_ROOT, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for args in command_lines]
  results = []
  for process in processes:
    stderr = process.communicate(timeout=120)[1]
    results.append((process.returncode, stderr))
  return results


def test_input_benchmark_prints_one_json_line(tmp_path):
  result = _run('input', '--config', 'configs/nfnet.py:F1', '--config.data.train_resolution=48',
                '--config.data.randaugment_layers=2', '--num_images', '8', '--seconds', '0.1',
                '--batch_size', '4', '--rounds', '1')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert report['benchmark'] == 'input' and report['train_resolution'] == 48
  assert report['randaugment_layers'] == 2 and report['config'] == 'F1'
  assert report['randaugment_magnitude'] == 10.0  # F1's recipe
  for key in ('images_per_s', 'images_per_s_per_core', 'baseline_images_per_s_per_core',
              'speedup_per_core'):
    assert report[key] > 0, key
  assert report['timed_images']['project'] % 4 == 0 and report['timed_images']['project'] >= 4


def test_input_benchmark_times_the_pipeline_with_its_worker_processes():
  result = _run('input', '--config', 'configs/nfnet.py:F0', '--config.data.train_resolution=32',
                '--workers', '1', '--num_images', '8', '--seconds', '0.2', '--batch_size', '4')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert report['benchmark'] == 'input_pipeline' and report['config'] == 'F0'
  assert report['workers'] == 1 and report['threads_per_worker'] >= 2 and report['train_resolution'] == 32
  assert report['timed_batches'] >= 1 and report['examples_per_s'] > 0
  assert report['examples_per_s_per_core'] == pytest.approx(report['examples_per_s'], rel=0.01)
  # The chunks travel through shared memory: the worker process really made them.
  assert report['shared_memory_peak_bytes'] > 0
  assert report['cpu_seconds'] > 0 and report['examples_per_cpu_s'] > 0
  bound = report['memory_in_flight_bound_bytes']
  assert bound['assembling'] == 2 * 4 * (32 * 32 * 3 + 4 * benchmark.NUM_CLASSES)


def test_unknown_subcommand_and_bad_sizes_are_rejected():
  command_lines = (['train_stepx'], ['input', '--num_images', '0'], ['input', '--config', 'configs/absent.py:F0'],
                   ['input', '--workers', '-2'], ['input', '--eval_pipeline'])
  for args, (status, stderr) in zip(command_lines, _refusals(*command_lines)):
    assert status != 0 and stderr.startswith('error:') and stderr.count('\n') == 1, args


def test_both_transforms_make_uint8_examples_from_disjoint_pairs_of_jpegs(tmp_path):
  jpegs = benchmark.make_jpegs(8, str(tmp_path), seed=1)
  assert len(list(tmp_path.glob('*.jpg'))) == 8
  settings = dict(benchmark.DEFAULT_INPUT_SETTINGS, train_resolution=32)
  assert benchmark.crops_per_example(settings) == 2
  labels = np.arange(8)
  for transform in (benchmark.project_transform, benchmark.baseline_transform):
    batch = transform(jpegs, labels, np.random.default_rng(0), settings)
    assert batch['images'].shape == (4, 32, 32, 3) and batch['images'].dtype == np.uint8
    np.testing.assert_allclose(batch['labels'].sum(axis=1), 1.0, rtol=1e-5)
    # Example i is made from JPEGs 2i and 2i + 1 (their labels), each JPEG used once.
    for i, target in enumerate(batch['labels']):
      assert set(np.nonzero(target)[0]) <= {2 * i, 2 * i + 1}


def _step_args(command, **overrides):
  args = dict(command=command, config_name='tiny_setup', resolution=None, batch=8, dtype=None, steps=2,
              warmup=1, baseline=None, matmul_size=256, remat=None, compile=True)
  return types.SimpleNamespace(**{**args, **overrides})


@pytest.mark.slow
def test_train_benchmark_times_the_loops_own_step(monkeypatch):
  from nfnets import trainer
  built = {}
  setup_training, pmap_train_step = trainer.setup_training, trainer.pmap_train_step

  def spy_setup(config, num_train_examples, **kwargs):
    built.setdefault('setups', []).append(setup_training(config, num_train_examples, **kwargs))
    return built['setups'][-1]

  def spy_pmap(setup, devices=None):
    built.setdefault('pmapped', []).append((setup, devices))
    return pmap_train_step(setup, devices)

  monkeypatch.setattr(trainer, 'setup_training', spy_setup)
  monkeypatch.setattr(trainer, 'pmap_train_step', spy_pmap)
  batch = tiny_setup.BATCH_SIZE  # the shared tiny set-up's one-device step: other tests compile it too
  report = benchmark.run_step(_step_args('train', batch=batch, dtype='float32', baseline='native'),
                              tiny_setup.tiny_config())
  json.dumps(report)
  # The step timed is the trainer's, pmapped over one device, once as configured and once as baseline.
  assert [s for s, _ in built['pmapped']] == built['setups'] and len(built['setups']) == 2
  assert all(len(devices) == 1 for _, devices in built['pmapped'])
  assert (report['benchmark'], report['config'], report['dtype'], report['batch_size'], report['resolution']) == (
      'train', 'tiny_setup', 'float32', batch, tiny_setup.RESOLUTION)
  assert report['grouped_conv'] == 'split' and report['baseline']['grouped_conv'] == 'native'
  assert report['steps'] == 2 and report['warmup_steps'] == 1
  assert report['compile_s'] > 0 and report['trace_s'] > 0
  assert 0 < report['step_s_min'] <= report['step_s_median']
  assert report['images_per_s'] == pytest.approx(batch / report['step_s_median'], rel=1e-2)
  assert report['flops_per_step'] > 1e6
  assert report['achieved_flops_per_s'] == pytest.approx(report['flops_per_step'] / report['step_s_median'],
                                                         rel=1e-2)
  assert report['peak_matmul_flops_per_s'] > 0 and report['peak_matmul_size'] == 256
  assert report['mfu'] == pytest.approx(report['achieved_flops_per_s'] / report['peak_matmul_flops_per_s'],
                                        rel=1e-2, abs=1e-4)
  assert report['peak_host_memory_mib'] > 0 and report['host_cpu_s_per_step'] > 0
  assert len(report['load_average_1min']) == 2
  assert report['speedup_vs_baseline'] == pytest.approx(
      report['baseline']['step_s_median'] / report['step_s_median'], rel=1e-2)


@pytest.mark.slow
def test_eval_benchmark_from_the_command_line():
  result = _run('eval', '--config', 'configs/nfnet.py:tiny', '--batch', '8', '--steps', '1', '--warmup', '0',
                '--matmul_size', '128')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert (report['benchmark'], report['config'], report['batch_size'], report['dtype']) == ('eval', 'tiny', 8, 'float32')
  assert report['resolution'] == 32  # the tiny config's eval resolution
  assert report['flops_per_step'] > 0 and report['step_s_median'] > 0 and 'baseline' not in report


def test_the_step_flags_offer_only_compute_dtypes_the_models_accept():
  from nfnets import models
  from nfnets.errors import ConfigError
  from scripts import step_flags
  for dtype in step_flags.DTYPES:
    models.precision_policy(dtype)
  for dtype in ('float64', 'int8', 'float8_e4m3fn', 'complex64'):
    with pytest.raises(ConfigError, match='unknown compute dtype'):
      models.precision_policy(dtype)


def test_step_benchmarks_reject_bad_input():
  command_lines = (['train', '--steps', '0'], ['eval', '--batch', '0'], ['train', '--dtype', 'float64'],
                   ['train', '--baseline', 'fast'])
  for args, (status, stderr) in zip(command_lines, _refusals(*command_lines)):
    assert status != 0 and stderr.startswith('error:') and stderr.count('\n') == 1, args


@pytest.mark.parametrize('eval_pipeline', [False, True])
def test_pipeline_benchmark_reports_rates_and_the_memory_bound(tmp_path, eval_pipeline):
  from scripts import pipeline_benchmark
  from configs import nfnet
  data = nfnet.get_config('F0').data
  data.train_resolution, data.eval_resolution = 32, 40
  jpegs = benchmark.make_jpegs(4, str(tmp_path), seed=2)
  report = pipeline_benchmark.run(data, jpegs, workers=0, batch_size=4, seconds=0.05, seed=0,
                                  num_classes=10, eval_pipeline=eval_pipeline, min_train_examples=8)
  assert report['workers'] == 0 and report['timed_batches'] >= 1 and report['examples_per_s'] > 0
  example = 4 * 40 * 40 * 3 + 8 if eval_pipeline else 32 * 32 * 3 + 4 * 10
  assert report['memory_in_flight_bound_bytes']['assembling'] == 2 * 4 * example
  assert report['chunk_size'] == 4 and report['eval_resolution'] == 40
