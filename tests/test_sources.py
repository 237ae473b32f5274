"""Data sources: the dataset registry, the bundled digits dataset, the synthetic source, the generic TFDS path
and missing-data errors."""
import dataclasses
import io
import json
import os
import threading

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common
from nfnets.data import digits
from nfnets.data import imagenet
from nfnets.data import sources
from nfnets.data import synthetic


def _data_config(name, data_dir=None):
  return ml_collections.ConfigDict({'name': name, 'data_dir': data_dir})


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  return digits.prepare(str(tmp_path_factory.mktemp('tfds')))


def _decode(image_bytes):
  return np.asarray(Image.open(io.BytesIO(image_bytes)))


def test_digits_splits_hold_every_image_once_with_all_classes(digits_dir):
  from sklearn.datasets import load_digits
  reference = load_digits()
  config = _data_config('digits', digits_dir)
  total = 0
  for split, expected_count in digits.NUM_EXAMPLES.items():
    source = sources.get_source(config, split)
    assert len(source) == expected_count
    labels = np.array([source[i]['label'] for i in range(len(source))])
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 0 and counts.sum() == expected_count
    # Stratified: each class keeps its share of the full set to within one example.
    full_counts = np.bincount(reference.target, minlength=10)
    share = len(source) / len(reference.target)
    assert np.all(np.abs(counts - full_counts * share) <= 1)
    total += len(source)
  assert total == len(reference.target) == 1797
  assert sources.dataset_info(config) == sources.DatasetInfo(10, {'train': 1437, 'test': 360})


def test_digits_images_are_upscaled_real_digits(digits_dir):
  from sklearn.datasets import load_digits
  reference = load_digits()
  test_indices = digits.split_indices()['test']
  source = sources.get_source(_data_config('digits', digits_dir), 'test')
  example = source[0]
  image = _decode(example['image'])
  assert example['image'].startswith(b'\x89PNG')
  assert image.shape == (digits.IMAGE_SIZE, digits.IMAGE_SIZE, 3) and image.dtype == np.uint8
  assert np.array_equal(image[..., 0], image[..., 2])  # Grey replicated into RGB.
  # Shrinking back to 8x8 must recover one of the original test digits with the same label.
  small = np.asarray(Image.fromarray(image[..., 0]).resize((8, 8), Image.BOX), np.float32)
  originals = reference.images[test_indices] * (255.0 / 16.0)
  nearest = np.argmin(np.abs(originals - small).reshape(len(originals), -1).mean(axis=1))
  assert reference.target[test_indices[nearest]] == example['label']
  assert np.abs(originals[nearest] - small).mean() < 20


def test_digits_prepare_reuses_a_finished_copy_and_ignores_leftovers(tmp_path):
  data_dir = str(tmp_path)
  # An interrupted earlier build: an abandoned scratch dir and an empty dataset folder.
  os.makedirs(os.path.join(data_dir, '.sklearn_digits-building-dead'))
  os.makedirs(os.path.join(data_dir, digits.DATASET_NAME))
  assert not digits.is_prepared(data_dir)
  threads = [threading.Thread(target=digits.prepare, args=(data_dir,)) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert digits.is_prepared(data_dir)
  info_path = os.path.join(data_dir, digits.DATASET_NAME, digits.VERSION, 'dataset_info.json')
  before = os.stat(info_path).st_mtime_ns
  assert digits.prepare(data_dir) == data_dir
  assert os.stat(info_path).st_mtime_ns == before
  with open(info_path) as f:
    splits = {s['name']: s for s in json.load(f)['splits']}
  assert set(splits) == {'train', 'test'}
  leftovers = [n for n in os.listdir(data_dir) if n.startswith('.sklearn_digits-building-')]
  assert leftovers == ['.sklearn_digits-building-dead']  # Ours were cleaned up.
  assert len(sources.get_source(_data_config('digits', data_dir), 'train')) == 1437


def test_digits_default_dir_follows_env(monkeypatch, tmp_path):
  monkeypatch.setenv(digits.DATA_DIR_ENV, str(tmp_path))
  assert digits.default_data_dir() == str(tmp_path)
  monkeypatch.delenv(digits.DATA_DIR_ENV)
  assert digits.default_data_dir().endswith(os.path.join('.cache', 'nfnets', 'tensorflow_datasets'))


def test_synthetic_source_is_deterministic_balanced_and_split_specific():
  config = _data_config('synthetic')
  train = sources.get_source(config, 'train')
  again = sources.get_source(config, 'train')
  test = sources.get_source(config, 'test')
  assert len(train) == synthetic.NUM_EXAMPLES['train']
  assert train[5] == again[5]
  assert train[5]['image'] != test[5]['image']
  image = _decode(train[3]['image'])
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  labels = [train[i]['label'] for i in range(100)]
  assert sorted(set(labels)) == list(range(10))
  assert sources.dataset_info(config).num_classes == 10
  with pytest.raises(IndexError):
    train[len(train)]


def test_synthetic_labels_are_learnable():
  """A nearest-centroid classifier on tiny thumbnails must beat chance by far."""
  config = _data_config('synthetic')

  def features(source, count):
    xs = [np.asarray(Image.open(io.BytesIO(source[i]['image'])).resize((8, 8)), np.float32).ravel()
          for i in range(count)]
    return np.stack(xs), np.array([source[i]['label'] for i in range(count)])

  train_x, train_y = features(sources.get_source(config, 'train'), 200)
  test_x, test_y = features(sources.get_source(config, 'test'), 100)
  centroids = np.stack([train_x[train_y == k].mean(axis=0) for k in range(10)])
  predictions = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  assert (predictions == test_y).mean() > 0.9


def test_missing_imagenet_names_the_directory_and_the_preparation_command(tmp_path):
  config = _data_config('imagenet2012', str(tmp_path))
  with pytest.raises(sources.DataNotFoundError) as error:
    sources.get_source(config, 'train')
  message = str(error.value)
  assert str(tmp_path) in message
  assert 'python -m scripts.prepare_imagenet --manual_dir' in message
  assert isinstance(error.value, FileNotFoundError) and '\n' not in message


def test_imagenet_in_tfrecord_format_is_reported(tmp_path):
  version_dir = tmp_path / 'imagenet2012' / '5.1.0'
  version_dir.mkdir(parents=True)
  (version_dir / 'dataset_info.json').write_text('{}')
  (version_dir / 'imagenet2012-train.tfrecord-00000-of-01024').write_text('')
  with pytest.raises(sources.DataNotFoundError, match='no array_record files'):
    sources.get_source(_data_config('imagenet2012', str(tmp_path)), 'train')


def test_imagenet_default_dir_and_info(monkeypatch, tmp_path):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  assert sources.tfds_default_data_dir() == str(tmp_path)
  info = sources.dataset_info(_data_config('imagenet2012'))
  assert info.num_classes == 1000 and info.num_examples['train'] == 1_281_167
  assert info.num_examples['validation'] == 50_000


def test_any_tfds_dataset_prepared_as_array_record_is_read_by_name(digits_dir, tmp_path):
  config = _data_config(f'tfds:{digits.DATASET_NAME}', digits_dir)
  assert sources.dataset_info(config) == sources.DatasetInfo(10, {'train': 1437, 'test': 360})
  source = sources.get_source(config, 'test[:7]')
  assert len(source) == 7
  assert source[3] == sources.get_source(_data_config('digits', digits_dir), 'test')[3]
  with pytest.raises(sources.DataNotFoundError, match='tfds build oxford_flowers102 .*--file_format=array_record'):
    sources.get_source(_data_config('tfds:oxford_flowers102', str(tmp_path)), 'train')
  with pytest.raises(ValueError, match='Unknown dataset'):
    sources.dataset_info(_data_config('tfds:'))


def test_unknown_dataset_and_split_are_rejected():
  with pytest.raises(ValueError, match='Unknown dataset') as error:
    sources.get_source(_data_config('cifar10'), 'train')
  # One line that lists every registered dataset and the generic path.
  assert "'cifar10'" in str(error.value) and '\n' not in str(error.value)
  assert 'digits, imagenet2012, synthetic, or tfds:NAME' in str(error.value)
  with pytest.raises(ValueError, match='Unknown synthetic split'):
    sources.get_source(_data_config('synthetic'), 'train[:10%]')


def test_registered_datasets_are_found_with_their_splits_and_classes():
  assert set(sources.dataset_names()) >= {'imagenet2012', 'digits', 'synthetic'}
  expected = {
      'imagenet2012': (imagenet.DATASET, 1000, {'train': 1_281_167, 'validation': 50_000, 'test': 100_000}),
      'digits': (digits.DATASET, 10, {'train': 1437, 'test': 360}),
      'synthetic': (synthetic.DATASET, 10, {'train': 1024, 'validation': 256, 'test': 256}),
  }
  for name, (dataset, num_classes, num_examples) in expected.items():
    assert sources.get_dataset(name) is dataset and dataset.name == name
    # dataset_info needs no data on disk for a registered dataset (no data_dir here exists).
    info = sources.dataset_info(_data_config(name, '/nonexistent'))
    assert info == sources.DatasetInfo(num_classes, num_examples)
    assert dataset.data_config['train_split'] in num_examples
    assert dataset.data_config['eval_split'] in num_examples
  with pytest.raises(ValueError, match='registered twice'):
    sources.register(synthetic.DATASET)


def test_a_new_dataset_is_one_registration(monkeypatch):
  """Registering a `Dataset` is all it takes: the config helper, dataset_info and get_source find it."""
  monkeypatch.setattr(sources, '_DATASETS', dict(sources._DATASETS))  # pylint: disable=protected-access
  shapes = synthetic.SyntheticSource(12, num_classes=3, image_size=16)
  sources.register(sources.Dataset(
      name='three_shapes', num_classes=3, num_examples={'train': 12, 'eval': 12},
      source=lambda split, data_dir: shapes, preparation='nothing to prepare',
      data_config={'train_split': 'train', 'eval_split': 'eval', 'flip': False}))
  config = common.use_dataset(common.base_config('nfnet', 'F0'), 'three_shapes')
  assert (config.model.num_classes, config.data.name, config.data.eval_split, config.data.flip) == (
      3, 'three_shapes', 'eval', False)
  assert sources.dataset_info(config.data) == sources.DatasetInfo(3, {'train': 12, 'eval': 12})
  assert sources.get_source(config.data, 'train') is shapes
  assert 'three_shapes' in sources.dataset_names()
  with pytest.raises(ValueError, match='tfds: prefix'):
    sources.register(dataclasses.replace(sources.get_dataset('three_shapes'), name='tfds:shapes'))


def test_use_dataset_gives_digits_its_classes_splits_and_preprocessing():
  config = common.use_dataset(common.base_config('nfnet', 'F0'), 'digits')
  assert config.model.num_classes == 10 and config.data.name == 'digits'
  assert (config.data.train_split, config.data.eval_split) == ('train', 'test')
  assert (config.data.crop_min_area, config.data.flip, config.data.mix) == (0.6, False, 'none')
  # ImageNet's own entries are the recipe's defaults.
  imagenet_config = common.use_dataset(common.base_config('nfnet', 'F0'), 'imagenet2012')
  assert imagenet_config.to_dict() == common.base_config('nfnet', 'F0').to_dict()
