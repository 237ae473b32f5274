"""The checkpoint format itself (nfnets/checkpoint.py): the items a training checkpoint holds and its meta,
weights-only checkpoints, the paths `read` accepts, the single-file formats, and the refusals.

Nothing here trains or compiles: the weights are random arrays shaped like the tiny NFNet's (the meta's model
config must build the stored model), the optimiser state and data iterator are small stand-ins.
"""
import json
import os
import shutil

import grain
import jax
import numpy as np
import optax
import pytest

from nfnets import checkpoint
from nfnets import models
from nfnets import train_state
from nfnets.errors import CheckpointError
from tests import helpers
from tests import tiny_setup

TIMM_FILE = os.path.join(helpers.REPO_ROOT, 'tests', 'fixtures', 'timm_nfnet', 'small_nfnet.safetensors')


@pytest.fixture(scope='module')
def model_config():
  # As the JSON meta gives it back (lists for tuples).
  return json.loads(json.dumps(tiny_setup.tiny_config().model.to_dict()))


@pytest.fixture(scope='module')
def shapes(model_config):
  params, model_state = models.abstract_params(model_config)
  assert model_state == {}  # NFNets keep no state: the states below are empty too, as `read` expects
  return helpers.module_shapes(params)


def _weights(shapes, seed):
  rng = np.random.default_rng(seed)
  return {m: {n: rng.normal(size=s).astype(np.float32) for n, s in p.items()} for m, p in shapes.items()}


def _state(shapes, step, seed=0):
  """A train state with every field distinct and non-trivial (its optimiser state: SGD momentum's)."""
  params, ema_params = _weights(shapes, seed), _weights(shapes, seed + 1)
  opt_state = jax.tree.map(lambda x: x * 0.5, optax.sgd(0.1, momentum=0.9).init(params))
  return train_state.TrainState(
      step=np.array(step, np.int32), params=params, model_state={}, opt_state=opt_state, ema_params=ema_params,
      ema_model_state={}, rng=np.array([seed, 7], np.uint32), nonfinite_streak=np.array(2, np.int32),
      loss_scale=np.array(1024.0, np.float32), loss_scale_counter=np.array(3, np.int32),
      skipped_overflow=np.array(4, np.int32), skipped_nonfinite=np.array(5, np.int32))


def _items(step_directory):
  return sorted(name for name in os.listdir(step_directory) if (step_directory / name).is_dir())


def _data_iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(a, b)


def _meta(model_config):
  return {'model': model_config, 'config': {'model': model_config, 'seed': 3}}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, shapes, model_config):
  """A run's workdir with checkpoints at steps 4 and 6 (save_every 2, keep 2: step 2's was removed, step 3 is
  off the grid); the data iterator had handed out 3 elements by step 4 and 4 by step 6."""
  directory = tmp_path_factory.mktemp('run')
  saver = checkpoint.TrainingCheckpointer(directory / 'checkpoints', save_every=2, keep=2)
  data = _data_iterator()
  for step in (2, 3, 4, 6):
    next(data)
    assert saver.save(_state(shapes, step, seed=step), data, _meta(model_config)) == (step != 3)
  saver.wait_until_finished()
  saver.close()
  return directory


def test_a_training_checkpoint_holds_four_items_and_meta_says_what_it_stores(workdir, model_config):
  directory = workdir / 'checkpoints'
  assert sorted(os.listdir(directory)) == ['4', '6']
  assert _items(directory / '6') == sorted(checkpoint.ITEMS)
  meta = json.loads((directory / '6' / 'meta' / 'metadata').read_text())
  assert meta == dict(_meta(model_config), step=6, weight_sets=list(checkpoint.WEIGHT_SETS))


def test_the_saving_grid_forced_saves_and_no_step_twice(workdir, shapes, model_config, tmp_path):
  saver = checkpoint.TrainingCheckpointer(workdir / 'checkpoints', save_every=2, keep=2)
  assert saver.latest_step() == 6
  assert not saver.wants(6) and not saver.wants(6, force=True)  # written already
  assert saver.wants(8) and not saver.wants(7) and saver.wants(7, force=True)
  saver.close()
  fresh = checkpoint.TrainingCheckpointer(tmp_path / 'checkpoints', save_every=2, keep=2)
  assert fresh.latest_step() is None
  assert fresh.save(_state(shapes, 7), _data_iterator(), _meta(model_config), force=True)
  fresh.wait_until_finished()
  assert fresh.latest_step() == 7
  fresh.close()


def test_restore_gives_back_every_field_and_the_data_position(workdir, shapes):
  like = _state(shapes, 0, seed=99)
  for step, position in ((6, 4), (4, 3)):
    data = _data_iterator()
    saver = checkpoint.TrainingCheckpointer(workdir / 'checkpoints', save_every=2, keep=2)
    restored = saver.restore(step, like, data)
    saver.close()
    _assert_trees_equal(restored, _state(shapes, step, seed=step))
    assert isinstance(restored, train_state.TrainState)
    assert next(data) == position  # the iterator resumes after the elements consumed before the save


@pytest.mark.parametrize('where', ['workdir', 'checkpoints', 'latest step', 'older step'])
def test_read_accepts_a_workdir_its_checkpoints_or_one_step(workdir, shapes, model_config, where):
  path, step = {'workdir': (workdir, 6), 'checkpoints': (workdir / 'checkpoints', 6),
                'latest step': (workdir / 'checkpoints' / '6', 6),
                'older step': (workdir / 'checkpoints' / '4', 4)}[where]
  loaded = checkpoint.read(str(path))
  assert (loaded.kind, loaded.step, loaded.path) == ('project', step, str(workdir / 'checkpoints' / str(step)))
  assert loaded.model_config == model_config and loaded.config == _meta(model_config)['config']
  state = _state(shapes, step, seed=step)
  assert set(loaded.weight_sets) == {'', 'ema_'}
  _assert_trees_equal(loaded.weight_sets[''], (state.params, state.model_state))
  _assert_trees_equal(loaded.weight_sets['ema_'], (state.ema_params, state.ema_model_state))


def test_a_weights_only_checkpoint_holds_weights_and_meta_and_reads_back(shapes, model_config, tmp_path):
  params = _weights(shapes, seed=11)
  destination = tmp_path / 'converted'
  checkpoint.save_weights(destination, params, {}, meta={'model': model_config}, step=12)
  assert os.listdir(destination) == ['12']
  assert _items(destination / '12') == ['meta', 'weights']
  meta = json.loads((destination / '12' / 'meta' / 'metadata').read_text())
  assert meta == {'model': model_config, 'step': 12, 'weight_sets': ['params', 'model_state']}
  loaded = checkpoint.read(destination)
  assert (loaded.kind, loaded.step, loaded.config, set(loaded.weight_sets)) == ('project', 12, None, {''})
  _assert_trees_equal(loaded.weight_sets[''], (params, {}))
  with pytest.raises(CheckpointError, match='converted already exists; choose a new output directory'):
    checkpoint.save_weights(destination, params, {}, meta={'model': model_config})


def test_a_timm_safetensors_file_is_read_by_its_suffix_or_when_named():
  assert checkpoint.file_kind(TIMM_FILE) == 'timm' and checkpoint.file_kind('F0_haiku.npz') == 'reference'
  for file_format in (None, 'timm'):
    loaded = checkpoint.read(TIMM_FILE, file_format)
    assert (loaded.kind, loaded.step, loaded.config, loaded.path) == ('timm', 0, None, TIMM_FILE)
    assert loaded.model_config['name'] == 'nfnet' and set(loaded.weight_sets) == {''}
    params, model_state = loaded.weight_sets['']
    assert model_state == {}
    assert helpers.module_shapes(params) == helpers.module_shapes(
        models.abstract_params(loaded.model_config)[0])


def _error(path, file_format=None, names_path=True) -> str:
  """The message `read` refuses `path` with, checked to be one line (naming the path)."""
  with pytest.raises(CheckpointError) as error:
    checkpoint.read(path, file_format)
  message = str(error.value)
  assert '\n' not in message, message
  assert not names_path or str(path) in message, message
  return message


def _copy_of(workdir, tmp_path):
  """A copy of the workdir's step-6 checkpoint alone, to damage."""
  copy = tmp_path / 'copy'
  shutil.copytree(workdir / 'checkpoints' / '6', copy / '6')
  return copy


def test_missing_and_empty_directories_are_refused(tmp_path):
  assert _error(tmp_path / 'nowhere').startswith('no checkpoint at ')
  (tmp_path / 'empty').mkdir()
  assert 'holds no complete checkpoint' in _error(tmp_path / 'empty')
  # A step orbax never finalised (a save interrupted) is not a checkpoint either.
  (tmp_path / 'interrupted' / '3.orbax-checkpoint-tmp-1').mkdir(parents=True)
  assert 'holds no complete checkpoint' in _error(tmp_path / 'interrupted')


def test_corrupt_metadata_is_refused(workdir, tmp_path):
  copy = _copy_of(workdir, tmp_path)
  (copy / '6' / 'meta' / 'metadata').write_text('{"model": ')
  assert 'unreadable checkpoint metadata' in _error(copy)
  (copy / '6' / 'meta' / 'metadata').unlink()
  assert 'unreadable checkpoint metadata' in _error(copy)


@pytest.mark.parametrize('model', [None, 'not a config', {'name': 'nfnet', 'variant': 'F9'}])
def test_metadata_without_a_usable_model_config_is_refused(workdir, tmp_path, model):
  copy = _copy_of(workdir, tmp_path)
  meta_file = copy / '6' / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  if model is None:
    del meta['model']
  else:
    meta['model'] = model
  meta_file.write_text(json.dumps(meta))
  assert 'no usable model config in its metadata' in _error(copy)


def _write_model(copy, model):
  meta_file = copy / '6' / 'meta' / 'metadata'
  meta_file.write_text(json.dumps(dict(json.loads(meta_file.read_text()), model=model)))


def test_weights_that_do_not_fit_the_meta_model_are_refused(workdir, tmp_path, model_config):
  copy = _copy_of(workdir, tmp_path)
  # Same modules, other widths: orbax would hand back the stored shapes under the wider model's name.
  _write_model(copy, dict(model_config, widths=[2 * w for w in model_config['widths']]))
  assert _error(copy).endswith("does not fit its model: ['ema_params']['NFNet/~/final_conv']['bias'] has shape "
                               "(256,), the model needs (512,)")
  # More blocks: a module the stored weights lack.
  _write_model(copy, dict(model_config, depths=[1, 2, 1, 1]))
  assert 'is damaged or does not fit its model: ' in _error(copy)


@pytest.mark.parametrize('damage', ['garbled', 'truncated', 'deleted'])
def test_damaged_weights_are_refused(workdir, tmp_path, damage):
  copy = _copy_of(workdir, tmp_path)
  data_files = [path for path in (copy / '6' / 'weights').rglob('*') if path.parent.name == 'd']
  assert data_files
  for path in data_files:
    if damage == 'garbled':
      path.write_bytes(b'\x00not an array' * 10)
    elif damage == 'truncated':
      path.write_bytes(path.read_bytes()[:10])
    else:
      path.unlink()
  assert 'is damaged or does not fit its model: ' in _error(copy)


def test_a_step_without_its_weights_item_is_refused(workdir, tmp_path):
  copy = _copy_of(workdir, tmp_path)
  shutil.rmtree(copy / '6' / 'weights')
  assert 'is damaged or does not fit its model: ' in _error(copy)
  # Named directly, the step directory is no longer recognisable as one.
  assert 'holds no complete checkpoint' in _error(copy / '6')


def test_files_that_are_not_checkpoints_and_bad_format_names_are_refused(tmp_path):
  notes = tmp_path / 'notes.txt'
  notes.write_text('not a checkpoint')
  _error(notes)
  _error(notes, 'timm')
  assert "unknown weights file format 'orbax'" in _error(notes, 'orbax', names_path=False)
  assert 'is not a file; a timm checkpoint is one file' in _error(tmp_path, 'timm')
