"""The training loop end to end on the bundled digits: learning, eval coverage, resume, NaN stop, errors."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from nfnets import checkpoint
from nfnets import errors
from nfnets import evaluate
from nfnets import trainer
from nfnets.data import pipeline
from tests import tiny_setup
from tests.helpers import REPO_ROOT
from tests.tiny_setup import tiny_config


def _rows(workdir):
  """metrics.jsonl's rows, parsed strictly: NaN or Infinity (not JSON) fail the test."""

  def refuse(constant):
    raise ValueError(f'metrics.jsonl holds {constant}, which is not JSON')

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def _logged(workdir, key):
  return [(r['step'], r[key]) for r in _rows(workdir) if key in r]


def _final_weights(workdir):
  return checkpoint.read(os.path.join(workdir, 'checkpoints')).weight_sets


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  results = trainer.train_and_evaluate(tiny_config(), workdir)
  return workdir, results


def test_short_run_learns_logs_and_evaluates_every_example(uninterrupted):
  workdir, results = uninterrupted
  losses = [loss for _, loss in _logged(workdir, 'train/loss')]
  assert len(losses) == tiny_setup.NUM_STEPS // 5
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1
  assert results['num_examples'] == tiny_setup.DIGITS_TEST_EXAMPLES
  for key in ('top1', 'top5', 'ema_top1', 'ema_top5'):
    assert 0.0 <= results[key] <= 1.0
  assert results['top1'] > 0.3  # 10 classes: chance is 0.1
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert [s for s, _ in _logged(workdir, 'eval/top1')] == [tiny_setup.NUM_STEPS]
  assert os.listdir(os.path.join(workdir, 'tb'))


def test_resumed_run_ends_with_bitwise_identical_weights(uninterrupted, tmp_path):
  workdir = str(tmp_path / 'resumed')
  assert trainer.train_and_evaluate(tiny_config(), workdir, stop_after_step=15) == {}
  assert checkpoint.TrainingCheckpointer(os.path.join(workdir, 'checkpoints'), save_every=10,
                                         keep=3).latest_step() == 15
  results = trainer.train_and_evaluate(tiny_config(), workdir)
  expected, resumed = _final_weights(uninterrupted[0]), _final_weights(workdir)
  assert set(expected) == set(resumed) == {'', 'ema_'}
  for name in expected:
    for a, b in zip(jax.tree.leaves(expected[name]), jax.tree.leaves(resumed[name])):
      np.testing.assert_array_equal(a, b)
  assert results == uninterrupted[1]


def test_evaluating_the_checkpoint_reproduces_the_final_eval(uninterrupted):
  workdir, results = uninterrupted
  assert evaluate.evaluate_checkpoint(tiny_config(), workdir) == results
  # Without --config the checkpoint's own run config (its eval batch size included) is used.
  command = subprocess.run([sys.executable, '-m', 'experiments.eval', '--checkpoint', workdir],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert command.returncode == 0, command.stderr
  printed = json.loads(command.stdout.strip().splitlines()[-1])
  assert {k: printed[k] for k in results} == results
  refused = subprocess.run([sys.executable, '-m', 'experiments.eval', '--checkpoint', workdir,
                            '--config.train.eval_batch_size=32'],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 1 and refused.stderr.strip() == (
      'error: --config.* overrides need --config (the config they override)')


class _Intercepted:
  """The real train iterator (its saved state too), with `action(batch)` applied from the `start`-th batch on."""

  def __init__(self, iterator, start, action):
    self._iterator, self._start, self._action, self._served = iterator, start, action, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    self._served += 1
    return self._action(batch) if self._served >= self._start else batch

  # grain's checkpoint handler stores any non-grain iterator's state as the bytes get_state returns.
  def get_state(self) -> bytes:
    return json.dumps(self._iterator.get_state()).encode()

  def set_state(self, state: bytes):
    self._iterator.set_state(json.loads(state))


def _intercept_train_batches(monkeypatch, start, action):
  make_train_iterator = pipeline.make_train_iterator
  monkeypatch.setattr(pipeline, 'make_train_iterator',
                      lambda *a, **k: _Intercepted(make_train_iterator(*a, **k), start, action))


def _with_a_nan_target(batch):
  # Training images are uint8 (no NaN possible); a NaN target poisons the loss just as well.
  batch = dict(batch, labels=batch['labels'].copy())
  batch['labels'][0, 0, 0] = np.nan
  return batch


def test_sigterm_checkpoints_and_stops_and_the_rerun_finishes_the_same(uninterrupted, tmp_path, monkeypatch):
  def preempt(batch):
    os.kill(os.getpid(), signal.SIGTERM)  # as a TPU VM's maintenance event would
    return batch

  workdir = str(tmp_path / 'preempted')
  handler_before = signal.getsignal(signal.SIGTERM)
  with monkeypatch.context() as patch:
    _intercept_train_batches(patch, 7, preempt)
    assert trainer.train_and_evaluate(tiny_config(), workdir) == {}
  assert signal.getsignal(signal.SIGTERM) == handler_before
  # The signal comes as the host reads batch 7, which the device prefetch does while step 6 runs
  # (batch 7 is the second batch queued ahead of it).
  assert tiny_config().data.device_prefetch == 2
  assert checkpoint.TrainingCheckpointer(os.path.join(workdir, 'checkpoints'), save_every=10,
                                         keep=3).latest_step() == 6
  assert trainer.train_and_evaluate(tiny_config(), workdir) == uninterrupted[1]


@pytest.mark.parametrize('log_every_steps', [5, pytest.param(10, marks=pytest.mark.slow)])
def test_a_run_of_nonfinite_steps_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys,
                                                                           log_every_steps):
  # Batches 13 on are poisoned; the streak reaches the limit of 3 at step 15. Logging every 10 steps, the
  # loop reads no streak between steps 10 and 20: it finds it when step 20 is about to be checkpointed,
  # names the step where it happened, and does not write step 20.
  _intercept_train_batches(monkeypatch, 13, _with_a_nan_target)
  config = tiny_config()
  config.train.max_consecutive_nonfinite = 3
  config.train.log_every_steps = log_every_steps
  workdir = str(tmp_path / 'nan')
  with pytest.raises(errors.TrainingError, match='3 consecutive non-finite losses or gradients at step 15'):
    trainer.train_and_evaluate(config, workdir)
  # The step-10 checkpoint is the last one and holds finite weights; the poisoned steps changed nothing.
  assert checkpoint.TrainingCheckpointer(os.path.join(workdir, 'checkpoints'), save_every=10,
                                         keep=3).latest_step() == 10
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_final_weights(workdir)))
  logged = [v for s, v in _logged(workdir, 'train/finite') if s in (10, 15)]
  assert logged == ([1.0, 0.0] if log_every_steps == 5 else [1.0])
  # Strict JSON: the step-15 row writes its NaN loss as null, next to its flag, and counts the skips.
  rows = {row['step']: row for row in _rows(workdir) if 'train/loss' in row}
  assert rows[10]['skipped_updates/nonfinite'] == 0 and rows[10]['skipped_updates/overflow'] == 0
  if log_every_steps == 5:
    assert rows[15]['train/loss'] is None and rows[15]['train/finite'] == 0.0
    assert rows[15]['skipped_updates/nonfinite'] == 3
  printed = capsys.readouterr().out
  assert 'step 13: non-finite loss or gradient, update skipped (1 in a row)' in printed
  assert 'step 16:' not in printed  # stopped at the first step that reached the limit


def test_a_workdir_of_another_run_is_refused(uninterrupted):
  config = tiny_config()
  config.model.widths = (32, 64, 96, 160)
  with pytest.raises(ValueError, match='different `model`'):
    trainer.train_and_evaluate(config, uninterrupted[0])


def test_a_workdir_may_resume_with_remat_toggled_or_from_before_remat_existed(tmp_path):
  # remat changes memory and time only: the same run may resume with it on, and a config.json written
  # before the field existed still matches; any other model change is refused.
  workdir = epath.Path(tmp_path)
  stored = json.loads(tiny_config().to_json())
  del stored['model']['remat']
  (workdir / 'config.json').write_text(json.dumps(stored))
  config = tiny_config()
  for remat in (False, True):
    config.model.remat = remat
    trainer._check_workdir(config, workdir)
  config.model.stochdepth_rate = 0.5
  with pytest.raises(errors.ConfigError, match='different `model`'):
    trainer._check_workdir(config, workdir)


def _run_train(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.train', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('args, message', [
    (['--config.train.batch_sise=8'], 'no config field'),
    (['--config.train.batch_size=eight'], 'batch_size'),
    (['--config', 'configs/nfnet.py:F9'], "unknown NFNet variant 'F9'"),
    (['--config.data.name=cifar'], "cifar"),
    (['--config', 'configs/nfnet.py:F0', '--config.data.data_dir=/nonexistent'], 'prepare_imagenet'),
    (['--config.train.accumulation_steps=0'], 'config.train.accumulation_steps must be an integer >= 1, got 0'),
    # The default tiny preset trains at batch 64; the tests simulate 2 devices.
    (['--config.train.accumulation_steps=3'],
     'config.train.batch_size 64 does not split into 3 micro-batches on each of 2 devices'),
    (['--config.precision.compute_dtype=float16', '--config.precision.initial_loss_scale=0.5'],
     'compute_dtype float16 needs config.precision.initial_loss_scale >= 1, got 0.5'),
])
def test_bad_command_lines_fail_with_one_clear_line(args, message, tmp_path):
  result = _run_train(*args, '--workdir', str(tmp_path / 'w'))
  assert result.returncode != 0
  assert message in result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert not (tmp_path / 'w').exists()  # a run that never started leaves nothing behind


# --- gradient accumulation and float16 through the whole loop -------------------------------------------

def _accumulating_config():
  config = tiny_config(num_steps=12)
  config.train.accumulation_steps = 2  # micro-batches of 8 on each of the 2 simulated devices
  return config


@pytest.fixture(scope='module')
def accumulating(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('accumulating'))
  return workdir, trainer.train_and_evaluate(_accumulating_config(), workdir)


@pytest.mark.slow
def test_a_run_with_accumulation_preempted_mid_update_resumes_bitwise(accumulating, tmp_path, monkeypatch, capsys):
  def preempt(batch):
    os.kill(os.getpid(), signal.SIGTERM)  # while an update's micro-batches run on the devices
    return batch

  workdir = str(tmp_path / 'preempted')
  with monkeypatch.context() as patch:
    _intercept_train_batches(patch, 7, preempt)
    assert trainer.train_and_evaluate(_accumulating_config(), workdir) == {}
  assert 'batch 32 as 2 micro-batches of 8 per device' in capsys.readouterr().out
  # Checkpointed at an update boundary (the update in flight finished first), as without accumulation.
  assert checkpoint.TrainingCheckpointer(os.path.join(workdir, 'checkpoints'), save_every=10,
                                         keep=3).latest_step() == 6
  assert trainer.train_and_evaluate(_accumulating_config(), workdir) == accumulating[1]
  expected, resumed = _final_weights(accumulating[0]), _final_weights(workdir)
  for name in expected:
    for a, b in zip(jax.tree.leaves(expected[name]), jax.tree.leaves(resumed[name])):
      np.testing.assert_array_equal(a, b)
  # One row per logged update, each with the run's skip counts.
  rows = [row for row in _rows(accumulating[0]) if 'train/loss' in row]
  assert [row['step'] for row in rows] == [5, 10, 12]
  assert all(row['skipped_updates/overflow'] == row['skipped_updates/nonfinite'] == 0 for row in rows)


def _with_overflowing_targets(batch):
  # Finite targets of 3e4: the float32 loss stays finite, its float16 backward pass at a loss scale of
  # 2^15 overflows (the logits' cotangent is ~scale x target / batch, far above float16's 65504).
  return dict(batch, labels=batch['labels'] * np.float32(3e4))


@pytest.mark.slow
def test_float16_trains_the_tiny_preset_and_skips_an_injected_overflow(tmp_path, monkeypatch, capsys):
  config = tiny_config(num_steps=6)
  config.precision.compute_dtype = 'float16'
  config.train.log_every_steps = 2
  served = []

  def overflow_the_third(batch):
    served.append(None)
    return _with_overflowing_targets(batch) if len(served) == 1 else batch

  _intercept_train_batches(monkeypatch, 3, overflow_the_third)
  workdir = str(tmp_path / 'float16')
  results = trainer.train_and_evaluate(config, workdir)
  printed = capsys.readouterr().out
  assert 'step 3: float16 gradients overflowed at loss scale 32768; update skipped and the scale halved' in printed
  assert 'non-finite' not in printed
  rows = _rows(workdir)
  train_rows = {row['step']: row for row in rows if 'train/loss' in row}
  assert [train_rows[s]['skipped_updates/overflow'] for s in (2, 4, 6)] == [0, 1, 1]
  assert all(row['skipped_updates/nonfinite'] == 0 for row in rows)
  assert train_rows[4]['train/loss_scale'] == 2.0 ** 14 and train_rows[6]['train/finite'] == 1.0
  # The eval row carries the counts too; evaluation ran in float32 on trained, finite weights.
  assert rows[-1]['step'] == 6 and rows[-1]['skipped_updates/overflow'] == 1 and 'eval/top1' in rows[-1]
  assert results['top1'] > 0.1
  weights = _final_weights(workdir)['']
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(weights))
