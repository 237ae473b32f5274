"""Tests for scripts.benchmark: the input sub-command in a tiny mode, config loading."""
import json
import pathlib
import subprocess
import sys

import numpy as np

from scripts import benchmark

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'scripts.benchmark', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)


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


def test_unknown_subcommand_and_bad_sizes_are_rejected():
  for args in (['train_stepx'], ['input', '--num_images', '0'], ['input', '--config', 'configs/absent.py:F0']):
    result = _run(*args)
    assert result.returncode != 0 and result.stderr.startswith('error:') and result.stderr.count('\n') == 1


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
