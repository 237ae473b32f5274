"""The AGC ablation sweep: a small real grid end to end (tables, plots, resume, divergence), the sweep's
bookkeeping with a fake trainer, and one-line errors for bad grids."""
import csv
import json
import os
import subprocess
import sys

from etils import epath
import pytest

from nfnets import errors
from nfnets.studies import ablation
from nfnets.studies import ablation_plots
from nfnets.studies import sweeps
from tests import fake_gcs
from tests import tiny_setup
from tests.helpers import REPO_ROOT

# tiny_setup's train step is AGC at lambda 0.04, batch 32, base lr 2.0: the first run shares its compiled
# step with the trainer tests through the persistent cache. The second, unclipped at an absurd learning
# rate, turns non-finite within a few steps.
GRID = [ablation.RunSpec('agc', 0.04, tiny_setup.BATCH_SIZE, 2.0),
        ablation.RunSpec('none', 0.0, tiny_setup.BATCH_SIZE, 1e4)]
@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ablation'))
  results = ablation.run_sweep(tiny_setup.tiny_config(), GRID, workdir)
  return workdir, results


def test_a_trained_and_a_diverged_run_are_recorded(sweep):
  workdir, results = sweep
  agc, unclipped = results
  assert (agc['name'], unclipped['name']) == ('agc-lam0.04-bs32-lr2', 'none-lam0-bs32-lr10000')
  assert not agc['diverged'] and agc['top1'] > 0.3
  assert 0.0 < agc['agc_clipped_fraction'] <= 1.0 and agc['steps_per_sec'] > 0
  assert agc['steps'] == tiny_setup.NUM_STEPS
  assert unclipped['diverged'] and 'non-finite' in unclipped['reason'] and unclipped['top1'] is None
  assert unclipped['agc_clipped_fraction'] is None and unclipped['steps'] < tiny_setup.NUM_STEPS
  for r in results:
    assert os.path.exists(os.path.join(workdir, r['name'], 'checkpoints'))


def test_tables_and_plots_are_written(sweep):
  workdir, results = sweep
  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [(r['name'], r['diverged']) for r in rows] == [(r['name'], str(r['diverged'])) for r in results]
  assert float(rows[0]['top1']) == results[0]['top1']
  with open(os.path.join(workdir, 'results.md')) as f:
    table = f.read().splitlines()
  assert len(table) == 2 + len(results) and table[2].startswith('| agc | 0.04 | 32 | 2 (0.25) |')
  assert table[3].startswith('| none | – | 32 | 10000 (1.25e+03) | – | – | yes |')
  for path in ablation_plots.write_plots(results, workdir):
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_the_command_skips_finished_runs_and_writes_tables_and_plots(sweep):
  workdir, _ = sweep
  for name in ('results.csv', 'results.md', 'top1_vs_lambda.png', 'loss_curves.png'):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  command = subprocess.run(
      [sys.executable, '-m', 'experiments.agc_ablation', *tiny_setup.command_line_overrides(),
       f'--workdir={workdir}', '--modes=agc', '--lambdas=0.04', f'--batch_sizes={tiny_setup.BATCH_SIZE}',
       '--learning_rates=2'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert command.returncode == 0, command.stderr
  assert '[1/1] agc-lam0.04-bs32-lr2: finished before, skipped' in command.stdout
  assert 'training' not in command.stdout
  for name in ('results.csv', 'results.md', 'top1_vs_lambda.png', 'loss_curves.png'):
    assert os.path.exists(os.path.join(workdir, name))


def _fake_trainer(outcomes, calls):
  """A stand-in for train_and_evaluate returning (or raising) the next outcome, with a metrics.jsonl."""

  def train(config, run_dir):
    calls.append(run_dir)
    metrics = epath.Path(run_dir) / 'metrics.jsonl'
    metrics.parent.mkdir(parents=True, exist_ok=True)
    before = metrics.read_text() if metrics.exists() else ''
    metrics.write_text(before + json.dumps({'step': 10, 'train/loss': float('nan'), 'train/images_per_sec': 320.0,
                                            'train/agc_clipped_fraction': 0.25}) + '\n')
    outcome = outcomes.pop(0)
    if isinstance(outcome, Exception):
      raise outcome
    return outcome

  return train


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
  grid = ablation.make_grid(['none', 'agc'], [0.01, 0.1], [32], [0.5, 4.0])
  assert [spec.name for spec in grid] == [
      'none-lam0-bs32-lr0.5', 'agc-lam0.01-bs32-lr0.5', 'agc-lam0.1-bs32-lr0.5',
      'none-lam0-bs32-lr4', 'agc-lam0.01-bs32-lr4', 'agc-lam0.1-bs32-lr4']
  config = tiny_setup.tiny_config()
  good = {'top1': 0.9, 'ema_top1': 0.91}
  calls = []
  # The third run is preempted (the trainer checkpoints and returns {}): the sweep stops there.
  fake = _fake_trainer([good, errors.TrainingError('10 consecutive non-finite losses'), {}], calls)
  first = ablation.run_sweep(config, grid, str(tmp_path), train_fn=fake, say=lambda _: None)
  assert [r['diverged'] for r in first] == [False, True]
  assert first[1]['reason'].startswith('10 consecutive') and first[1]['top1'] is None
  assert first[0]['steps_per_sec'] == 10.0 and first[0]['final_train_loss'] is None
  assert first[0]['agc_clipped_fraction'] == 0.25
  assert not os.path.exists(os.path.join(tmp_path, grid[2].name, ablation.RESULT_FILE))
  # The rerun trains from the interrupted run on; a final accuracy at chance counts as diverged.
  calls.clear()
  fake = _fake_trainer([good, {'top1': 0.1, 'ema_top1': 0.1}, good, good], calls)
  second = ablation.run_sweep(config, grid, str(tmp_path), train_fn=fake, say=lambda _: None)
  assert calls == [os.path.join(tmp_path, spec.name) for spec in grid[2:]]
  assert second[:2] == first and [r['diverged'] for r in second[2:]] == [False, True, False, False]
  assert 'chance' in second[3]['reason']
  with open(os.path.join(tmp_path, 'results.md')) as f:
    assert len(f.read().splitlines()) == 2 + len(grid)
  # Changing the base config does not silently reuse runs made with another.
  config.seed = 1
  with pytest.raises(ValueError, match='different config'):
    ablation.run_sweep(config, grid, str(tmp_path), train_fn=_fake_trainer([], []), say=lambda _: None)


def test_each_trained_run_releases_its_compiled_programs(tmp_path, monkeypatch):
  """On CPU each compiled program holds thousands of memory mappings; a sweep that kept them all would
  pass Linux's per-process limit and segfault. Runs skipped as finished compile nothing."""
  released = []
  monkeypatch.setattr(sweeps, 'release_compiled_programs', lambda: released.append(True))
  grid = ablation.make_grid(['none'], [], [32], [0.5, 1.0, 2.0])
  good = {'top1': 0.9, 'ema_top1': 0.9}
  ablation.run_sweep(tiny_setup.tiny_config(), grid[:1], str(tmp_path), train_fn=_fake_trainer([good], []),
                     say=lambda _: None)
  assert len(released) == 1
  ablation.run_sweep(tiny_setup.tiny_config(), grid, str(tmp_path), train_fn=_fake_trainer([good, good], []),
                     say=lambda _: None)
  assert len(released) == 3


def test_a_sweep_writes_its_results_tables_and_plots_to_cloud_storage(monkeypatch):
  with fake_gcs.fake_gcs('sweeps') as env:
    for name, value in env.items():
      monkeypatch.setenv(name, value)
    grid = ablation.make_grid(['none', 'agc'], [0.02], [32], [1.0])
    fake = _fake_trainer([{'top1': 0.2, 'ema_top1': 0.3}, {'top1': 0.9, 'ema_top1': 0.9}], [])
    results = ablation.run_sweep(tiny_setup.tiny_config(), grid, 'gs://sweeps/agc', train_fn=fake,
                                 say=lambda _: None)
    ablation_plots.write_plots(results, 'gs://sweeps/agc')
    assert sorted(fake_gcs.list_objects(env, 'sweeps')) == sorted(
        ['agc/results.csv', 'agc/results.md', 'agc/top1_vs_lambda.png', 'agc/loss_curves.png'] +
        [f'agc/{spec.name}/{name}' for spec in grid for name in ('metrics.jsonl', ablation.RESULT_FILE)])
    # Resuming from the bucket skips both runs.
    again = ablation.run_sweep(tiny_setup.tiny_config(), grid, 'gs://sweeps/agc', train_fn=_fake_trainer([], []),
                               say=lambda _: None)
    assert again == results


@pytest.mark.parametrize('grid, message', [
    (dict(modes=['agc', 'clip']), "unknown clipping mode 'clip'"),
    (dict(lambdas=[]), 'mode agc needs at least one lambda'),
    (dict(lambdas=[0.01, -1.0]), 'every lambda must be a positive number'),
    (dict(batch_sizes=[]), 'at least one of batch sizes'),
    (dict(learning_rates=[0.1, 0.1]), 'learning rates repeat a value'),
])
def test_bad_grids_are_refused(grid, message):
  with pytest.raises(ValueError, match=message):
    ablation.make_grid(**{**dict(modes=['none', 'agc'], lambdas=[0.01], batch_sizes=[32],
                                 learning_rates=[0.1]), **grid})


@pytest.mark.parametrize('args, message', [
    (['--modes=none,clip'], "unknown clipping mode 'clip'"),
    (['--lambdas=0.01,big'], '--lambdas: 0.01, big is not a list of numbers'),
])
def test_bad_grid_flags_fail_with_one_line(args, message, tmp_path):
  command = subprocess.run(
      [sys.executable, '-m', 'experiments.agc_ablation', f'--workdir={tmp_path / "w"}', *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert command.returncode != 0
  assert command.stderr.startswith('error: ') and message in command.stderr
  assert command.stderr.count('\n') == 1, command.stderr
  assert not (tmp_path / 'w').exists()
