"""scripts/reproduce_table.py end to end on a fake ImageNet and fake checkpoints, and its row matching."""
import csv
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import nfnet as nfnet_configs
from nfnets import checkpoint
from nfnets import models
from nfnets.data import imagenet
from scripts import convert_checkpoint
from scripts import reproduce_table
from tests import helpers
from tests import test_prepare_imagenet as fake_imagenet
from tests import tiny_setup
from tests.helpers import REPO_ROOT

CLASSIFIER = 'NFNet/~/linear'


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'scripts.reproduce_table', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
  """A prepared fake imagenet2012 whose validation split holds 5 images, and their labels."""
  manual_dir = tmp_path_factory.mktemp('manual')
  fake_imagenet._make_fake_archives(manual_dir)
  data_dir = imagenet.prepare(str(manual_dir), str(tmp_path_factory.mktemp('tfds')))
  names = fake_imagenet._tfds_label_names()
  labels = [names.index(synset) for synset in fake_imagenet._validation_label_lines()[:fake_imagenet.NUM_VAL]]
  return data_dir, np.array(labels)


@pytest.fixture(scope='module')
def checkpoints(imagenet_dir, tmp_path_factory):
  """A folder with a fake reference F0 file, its conversion, a tiny project checkpoint and a stray file.

  The F0 classifier ignores the image (zero weights) and ranks five classes by its bias: the first
  validation image's class first, so that the expected accuracies follow from the labels alone.
  """
  _, labels = imagenet_dir
  params = helpers.reference_params('F0', seed=3)
  ranked = list(dict.fromkeys(labels.tolist()))[:4]
  ranked += [c for c in range(1000) if c not in labels][:5 - len(ranked)]
  bias = np.zeros(1000, np.float32)
  bias[ranked] = np.arange(5, 0, -1)
  params[CLASSIFIER] = {'w': np.zeros_like(params[CLASSIFIER]['w']), 'b': bias}
  folder = tmp_path_factory.mktemp('checkpoints')
  helpers.write_reference_checkpoint(folder / 'F0_haiku.npz', params)
  convert_checkpoint.convert(str(folder / 'F0_haiku.npz'), str(folder / 'F0_converted'))
  tiny = tiny_setup.tiny_config()
  tiny_params, tiny_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), models.abstract_params(tiny.model))
  checkpoint.save_weights(folder / 'tiny_run', tiny_params, tiny_state,
                          meta={'model': tiny.model.to_dict(), 'config': json.loads(tiny.to_json())})
  (folder / 'notes.txt').write_text('not a checkpoint')
  expected_top1 = 100 * np.mean(labels == ranked[0])
  expected_top5 = 100 * np.mean(np.isin(labels, ranked))
  return folder, expected_top1, expected_top5


@pytest.mark.slow
def test_measures_every_f0_checkpoint_beside_the_published_row_and_says_what_it_skipped(
    imagenet_dir, checkpoints, tmp_path):
  data_dir, _ = imagenet_dir
  folder, top1, top5 = checkpoints
  assert 0 < top1 < top5 <= 100  # the rigged classifier gets some, not all, right
  out = tmp_path / 'out'
  # A handful of images at 32² keeps the full-size F0 cheap on a CPU.
  result = _run('--rows', 'F0,F1', '--checkpoints', str(folder), '--out', str(out),
                f'--config.data.data_dir={data_dir}', '--config.data.eval_resolution=32',
                '--config.data.eval_resize_margin=0', '--config.train.eval_batch_size=4')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  f0_rows = [line for line in lines if line.startswith('| F0 |')]
  assert len(f0_rows) == 2
  for line, name in zip(f0_rows, ('F0_converted', 'F0_haiku.npz')):
    assert line.startswith('| F0 | 71.49M | 71.49M | 12.38B | 12.38B | 192 / 256 | 83.6 | 96.8 | '
                           f'{top1:.2f} | {top5:.2f} | {name} (raw; 5 images at 32²) |'), line
  assert [line for line in lines if line.startswith('| F1 |')] == [
      '| F1 | 132.63M | 132.63M | 35.54B | 35.54B | 224 / 320 | 84.7 | 97.1 | – | – | – |']
  skipped = [line for line in lines if line.startswith('skipped: ')]
  assert len(skipped) == 3, skipped
  assert skipped[0].startswith(f'skipped: {folder / "notes.txt"}: not a checkpoint')
  assert skipped[1].startswith(f'skipped: {folder / "tiny_run"}: not the published F0 (depths')
  assert skipped[2] == f'skipped: measured accuracy of F1: no checkpoint of it in {folder}'

  with open(out / 'table.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['row'], r['checkpoint']) for r in rows] == [('F0', 'F0_converted'), ('F0', 'F0_haiku.npz'),
                                                         ('F1', '')]
  for r in rows[:2]:
    assert float(r['top1']) == pytest.approx(top1) and float(r['top5']) == pytest.approx(top5)
    assert (r['eval_resolution'], r['eval_examples'], r['weights']) == ('32', '5', 'raw')
    assert float(r['published_top1']) == 83.6 and float(r['params_millions']) == pytest.approx(71.49, abs=5e-3)
  assert (out / 'table.md').read_text() in result.stdout


def test_without_data_or_checkpoints_it_prints_the_architecture_and_one_line_per_skip(checkpoints, tmp_path):
  records, skipped = reproduce_table.reproduce(['F1'], None, {})
  assert skipped == ['measured accuracy: no --checkpoints folder given']
  table = reproduce_table.markdown(records)
  assert '| F1 | 132.63M | 132.63M | 35.54B | 35.54B | 224 / 320 | 84.7 | 97.1 | – | – | – |' in table, table
  folder = checkpoints[0]
  missing = str(tmp_path / 'no_imagenet')
  records, skipped = reproduce_table.reproduce(['F0'], str(folder), {'data.data_dir': missing})
  assert skipped[0].startswith(f'{folder / "notes.txt"}: not a checkpoint')
  assert len(skipped) == 2 and skipped[1].startswith(f'measured accuracy of the checkpoints in {folder}: '
                                                     f'imagenet2012 not found under {missing}')
  assert [r.get('top1') for r in records] == [None]


@pytest.mark.parametrize('model, run_config, expected', [
    (dict(variant='F0'), None, 'F0'),
    (dict(variant='F0', drop_rate=0.5, grouped_conv='split'), None, 'F0'),   # training-only differences
    (dict(variant='F5'), {'optimizer': {'sam_rho': 0.05}}, 'F5-sam'),
    (dict(variant='F6'), {'optimizer': {'sam_rho': 0.05}}, 'F6'),
    (dict(variant='F6'), None, 'F6'),   # the reference file, trained with SAM as published
    (dict(variant='F0'), {'optimizer': {'sam_rho': 0.05}}, None),
    (dict(variant='F0', num_classes=10), None, None),
    (dict(variant='F0+'), None, None),
])
def test_checkpoints_are_matched_to_their_published_row(model, run_config, expected):
  model_config = models.model_config('nfnet', **model).to_dict()
  row, reason = nfnet_configs.published_row(model_config, run_config)
  assert row == expected and bool(reason) == (expected is None)


def test_bad_command_lines_fail_with_one_line():
  result = _run('--config', 'configs/nfnet.py:F0')
  assert result.returncode == 1 and result.stderr.startswith('error: --config: each row') and (
      result.stderr.count('\n') == 1)
  result = _run('--rows', 'F9')
  assert result.returncode == 1 and result.stderr.strip() == (
      f'error: unknown row \'F9\'; published rows: {", ".join(nfnet_configs.PUBLISHED)}')
