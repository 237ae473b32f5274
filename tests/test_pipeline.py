"""grain pipelines: batch layout, determinism, host sharding, exact resume, exhaustive eval."""
import io
from collections import Counter

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from nfnets.data import digits
from nfnets.data import ops_image
from nfnets.data import pipeline
from nfnets.data import sources
from nfnets.data import workers

NUM_CLASSES = 10


def _data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name='synthetic', data_dir=None, train_split='train', eval_split='test',
      train_resolution=16, eval_resolution=16, eval_resize_margin=4, crop_min_area=0.08,
      flip=True, randaugment_layers=2, randaugment_magnitude=5.0, randaugment_after_mix=True,
      randaugment_semantics='reference', mix='mixup_cutmix', mixup_alpha=0.2, num_workers=0))
  config.update(overrides)
  return config


def _colour(index):
  # Odd levels 2k + 1: a resized flat image may come out a hair lower, which truncation to uint8
  # turns into 2k, still k after halving.
  return np.array([2 * (index % 128) + 1, 2 * (index // 128) + 1, 77], np.uint8)


def _index(levels):
  """Example index of a pixel (or pixels [..., 3]) of IndexCodedSource colours."""
  levels = np.asarray(levels).astype(int) // 2
  assert np.all(levels[..., 2] == 38), 'expected untouched flat images'
  return levels[..., 0] + 128 * levels[..., 1]


class IndexCodedSource:
  """Flat-colour PNGs whose colour spells the example's index, so any crop still names it."""

  def __init__(self, num_examples, num_classes=NUM_CLASSES):
    self._num_examples = num_examples
    self._num_classes = num_classes

  def __len__(self):
    return self._num_examples

  def __getitem__(self, index):
    if not 0 <= index < self._num_examples:
      raise IndexError(index)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(_colour(index), (12, 12, 3)).copy()).save(buffer, format='PNG')
    return {'image': buffer.getvalue(), 'label': index % self._num_classes}


def _ids(images):
  """Example indices of a batch of flat images from IndexCodedSource (uint8 or float32 pixels)."""
  flat = images.reshape(-1, *images.shape[-3:])
  if flat.dtype != np.uint8:
    flat = np.rint(flat)
  return list(_index(flat[:, 0, 0]))


@pytest.fixture
def coded_source(monkeypatch):
  source = IndexCodedSource(60)
  monkeypatch.setattr(sources, 'get_source', lambda data_config, split: source)
  return source


# Flat images must come through unchanged, so no mixing and no RandAugment.
_IDENTITY_AUGMENT = dict(mix='none', randaugment_layers=0)


def _train(config, **kwargs):
  kwargs.setdefault('global_batch_size', 8)
  kwargs.setdefault('seed', 0)
  kwargs.setdefault('local_device_count', 2)
  return pipeline.make_train_iterator(config, num_classes=NUM_CLASSES, **kwargs)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_train_batch_layout_and_mixed_targets():
  iterator = _train(_data_config())
  batches = _take(iterator, 3)
  for batch in batches:
    assert set(batch) == {'images', 'labels'}
    # uint8 for the device, which normalises (nfnets.train_step.normalize_images).
    assert batch['images'].shape == (2, 4, 16, 16, 3) and batch['images'].dtype == np.uint8
    assert batch['labels'].shape == (2, 4, NUM_CLASSES) and batch['labels'].dtype == np.float32
    np.testing.assert_allclose(batch['labels'].sum(-1), 1.0, atol=1e-5)
    assert np.all(batch['labels'] >= 0)
  # MixUp/CutMix must actually soften some targets.
  assert any(np.any((b['labels'] > 1e-3) & (b['labels'] < 1 - 1e-3)) for b in batches)


def test_without_mixing_targets_are_the_one_hot_labels(coded_source):
  batch = next(_train(_data_config(**_IDENTITY_AUGMENT)))
  ids = _ids(batch['images'])
  expected = np.eye(NUM_CLASSES)[[coded_source[i]['label'] for i in ids]]
  np.testing.assert_array_equal(batch['labels'].reshape(-1, NUM_CLASSES), expected)


def test_each_example_mixes_two_crops_that_no_other_example_uses(monkeypatch):
  # Labels are the example indices, so each target names the two crops it was made from.
  source = IndexCodedSource(48, num_classes=48)
  monkeypatch.setattr(sources, 'get_source', lambda data_config, split: source)
  config = _data_config(randaugment_layers=0, flip=False)
  iterator = pipeline.make_train_iterator(config, num_classes=48, global_batch_size=8, seed=0,
                                          local_device_count=2)
  used = []
  for batch in _take(iterator, 3):  # 3 x 8 examples from 48 crops: exactly one epoch.
    for device in range(2):
      for position in range(4):
        image = batch['images'][device, position].astype(np.float32)
        target = batch['labels'][device, position]
        crops = np.argsort(target)[-2:]
        assert target[crops].sum() == pytest.approx(1, abs=1e-6)
        colours = [_colour(c).astype(np.float32) for c in crops]
        if position < 2:  # MixUp: one blended colour everywhere
          expected = target[crops[0]] * colours[0] + target[crops[1]] * colours[1]
          assert np.abs(image - expected).max() <= 1.01
        else:  # CutMix: each crop's share of the pixels is its target weight
          pixel_ids = _index(image)
          assert set(np.unique(pixel_ids)) <= set(crops)
          for crop in crops:
            assert np.mean(pixel_ids == crop) == pytest.approx(target[crop], abs=1e-6)
        used += list(crops)
  assert sorted(used) == list(range(48))


def test_training_is_deterministic_given_the_seed():
  config = _data_config()
  _assert_same_batches(_take(_train(config, seed=3), 2), _take(_train(config, seed=3), 2))
  other = next(_train(config, seed=4))
  assert not np.array_equal(other['images'], next(_train(config, seed=3))['images'])


def test_hosts_see_disjoint_slices_covering_the_split_each_epoch(coded_source):
  config = _data_config(**_IDENTITY_AUGMENT)
  # 60 examples in global batches of 12: five batches are exactly one epoch.
  seen = {}
  for host in (0, 1):
    iterator = _train(config, global_batch_size=12, process_index=host, process_count=2)
    seen[host] = sum((_ids(b['images']) for b in _take(iterator, 5)), [])
    assert len(seen[host]) == 30
  assert sorted(seen[0] + seen[1]) == list(range(len(coded_source)))


@pytest.mark.parametrize('augment', [_IDENTITY_AUGMENT, {'mix': 'none'}, {}])
def test_the_global_batch_does_not_depend_on_the_number_of_hosts(augment):
  # Each host decodes its slice of the same global batch, with every random choice (mixing included)
  # keyed by the training example's global position: 2 hosts x 1 device see exactly what 1 host x 2
  # devices sees (the same per-device batch of 6).
  config = _data_config(**augment)
  one_host = _take(_train(config, global_batch_size=12, process_index=0, process_count=1, local_device_count=2), 3)
  hosts = [_take(_train(config, global_batch_size=12, process_index=h, process_count=2, local_device_count=1), 3)
           for h in (0, 1)]
  for step, batch in enumerate(one_host):
    for key in ('images', 'labels'):
      joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]], axis=0)
      np.testing.assert_array_equal(batch[key], joined)


@pytest.mark.parametrize('augment', [{'mix': 'none'}, {}])
def test_accumulation_keeps_the_examples_and_splits_mixing_by_micro_batch(augment):
  # 1 device running its batch of 12 as 2 micro-batches of 6 gets the batch of 2 devices x 6: the same
  # examples at the same positions, MixUp and CutMix splitting each micro-batch as each device batch.
  config = _data_config(**augment)
  micro = _take(_train(config, global_batch_size=12, local_device_count=1, accumulation_steps=2), 2)
  devices = _take(_train(config, global_batch_size=12, local_device_count=2), 2)
  for accumulated, split in zip(micro, devices):
    for key in ('images', 'labels'):
      np.testing.assert_array_equal(accumulated[key].reshape(split[key].shape), split[key])
  # Without mixing, the accumulation steps change nothing at all.
  whole = _take(_train(config, global_batch_size=12, local_device_count=1), 2)
  same = all(np.array_equal(a[key], b[key]) for a, b in zip(micro, whole) for key in ('images', 'labels'))
  assert same == (augment.get('mix') == 'none')


def test_one_epoch_visits_every_example_of_the_host_then_reshuffles(coded_source):
  config = _data_config(**_IDENTITY_AUGMENT)
  iterator = _train(config, global_batch_size=6, local_device_count=2)  # 60 = 10 batches.
  first_epoch = sum((_ids(b['images']) for b in _take(iterator, 10)), [])
  second_epoch = sum((_ids(b['images']) for b in _take(iterator, 10)), [])
  assert sorted(first_epoch) == sorted(second_epoch) == list(range(60))
  assert first_epoch != second_epoch


def test_resume_from_state_gives_the_exact_next_batch():
  config = _data_config()
  iterator = _train(config)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  fresh = _train(config)
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 2), expected)


def test_resume_through_an_orbax_checkpoint(tmp_path):
  config = _data_config()
  iterator = _train(config)
  _take(iterator, 2)
  with ocp.CheckpointManager(tmp_path, item_names=('data',)) as manager:
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 1)
  with ocp.CheckpointManager(tmp_path, item_names=('data',)) as manager:
    restored = manager.restore(
        2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(_train(config))))
  _assert_same_batches(_take(restored.data, 1), expected)


def test_resume_with_another_number_of_workers(coded_source):
  # The position counts host batches, so a state moves between worker layouts in both directions.
  threads_only = _data_config(**_IDENTITY_AUGMENT)
  single_process = _take(_train(threads_only), 3)
  after_one = _train(threads_only)
  _take(after_one, 1)
  iterator = _train(_data_config(num_workers=1, **_IDENTITY_AUGMENT))
  try:
    iterator.set_state(after_one.get_state())
    _assert_same_batches(_take(iterator, 1), single_process[1:2])
    state = iterator.get_state()
  finally:
    iterator.close()
  fresh = _train(threads_only)
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 1), single_process[2:])


def test_a_closed_iterator_does_not_start_again():
  iterator = _train(_data_config())
  _take(iterator, 1)
  iterator.close()
  with pytest.raises(ValueError, match='closed'):
    next(iterator)


def test_states_of_the_unchunked_pipeline_still_resume():
  # Before chunking, grain's own states: one element was one host batch.
  assert workers.batches_consumed({'next_index': 5}) == 5
  assert workers.batches_consumed({'next_index_in_cycle': 1, 'iterators_in_use_states': [
      {'next_index': 3}, {'next_index': 2}, {'next_index': 2}]}) == 7
  with pytest.raises(ValueError, match='position'):
    workers.batches_consumed({'step': 3})


def test_chunks_of_any_size_give_the_same_batches(coded_source, monkeypatch):
  config = _data_config(flip=False)  # mixing and RandAugment on: every random draw must agree
  whole = _take(_train(config), 2)
  evaluated = list(pipeline.make_eval_iterator(config, global_batch_size=14, local_device_count=2))
  monkeypatch.setattr(workers, 'CHUNK_BYTES', 1)  # one example per chunk
  _assert_same_batches(_take(_train(config), 2), whole)
  _assert_same_batches(list(pipeline.make_eval_iterator(config, global_batch_size=14,
                                                        local_device_count=2)), evaluated)


def test_eval_with_worker_processes_gives_the_threads_batches_and_stops(coded_source):
  kwargs = dict(global_batch_size=14, local_device_count=2)
  expected = list(pipeline.make_eval_iterator(_data_config(), **kwargs))
  iterator = pipeline.make_eval_iterator(_data_config(num_workers=1), **kwargs)
  _assert_same_batches(list(iterator), expected)
  with pytest.raises(StopIteration):
    next(iterator)


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_visits_every_example_once_and_masks_padding(coded_source, process_count):
  config = _data_config()
  seen = []
  for host in range(process_count):
    kwargs = dict(global_batch_size=14 * process_count, process_count=process_count,
                  local_device_count=2)
    batches = list(pipeline.make_eval_iterator(config, process_index=host, **kwargs))
    assert len(batches) == pipeline.num_eval_batches(config, **kwargs)
    for batch in batches:
      assert batch['images'].shape == (2, 7, 16, 16, 3) and batch['images'].dtype == np.float32
      assert batch['labels'].dtype == np.int32 and batch['mask'].dtype == np.float32
      real = batch['mask'].reshape(-1) == 1
      assert np.all(batch['images'].reshape(-1, 16, 16, 3)[~real] == 0)
      assert np.all(batch['labels'].reshape(-1)[~real] == 0)
      ids = _ids(batch['images'].reshape(-1, 16, 16, 3)[real])
      assert list(batch['labels'].reshape(-1)[real]) == [coded_source[i]['label'] for i in ids]
      seen += ids
  assert Counter(seen) == Counter(range(len(coded_source)))


def test_eval_matches_the_direct_transform_on_digits(tmp_path):
  config = _data_config(name='digits', data_dir=digits.prepare(str(tmp_path)), eval_resolution=24)
  source = sources.get_source(config, 'test')
  batches = list(pipeline.make_eval_iterator(config, global_batch_size=64, local_device_count=2))
  assert len(batches) == -(-len(source) // 64)
  images = np.concatenate([b['images'].reshape(-1, 24, 24, 3) for b in batches])
  labels = np.concatenate([b['labels'].reshape(-1) for b in batches])
  mask = np.concatenate([b['mask'].reshape(-1) for b in batches])
  assert mask.sum() == len(source) and np.all(mask[:len(source)] == 1)
  for index in (0, 17, len(source) - 1):
    # Pixels, not normalised: the eval step normalises them on the device.
    np.testing.assert_array_equal(images[index],
                                  ops_image.eval_pixels(source[index]['image'], 24, margin=4))
    assert labels[index] == source[index]['label']
  train = next(_train(config.copy_and_resolve_references(), global_batch_size=8))
  assert train['images'].shape == (2, 4, 16, 16, 3)


def test_batch_sizes_that_do_not_split_evenly_are_rejected():
  config = _data_config()
  with pytest.raises(ValueError, match='multiple of the process count'):
    _train(config, global_batch_size=9, process_count=2, process_index=0)
  with pytest.raises(ValueError, match='divisible by the 2 local devices'):
    _train(config, global_batch_size=6, process_count=2, process_index=0)
  with pytest.raises(ValueError, match='Unknown config.data.mix'):
    _train(_data_config(mix='cutout'))
  with pytest.raises(ValueError, match='randaugment_semantics'):
    _train(_data_config(randaugment_semantics='tf'))
  with pytest.raises(ValueError, match='process_index'):
    _train(config, process_index=2, process_count=2)
