"""Random-access data sources: ImageNet (TFDS array_record), bundled digits, synthetic images, and any other
TFDS image-classification dataset prepared as array_record (`config.data.name='tfds:NAME'`).

Every source is a sequence (`len`, `[index]`) of `{'image': encoded image bytes, 'label': int}`.
Images stay encoded so that the training pipeline can crop before it decodes, and so that all
three sources go through the same decoding code.
"""
import io
import os
from typing import Any, NamedTuple, Sequence

from etils import epath
import ml_collections
import numpy as np
from PIL import Image

from nfnets.data import digits
from nfnets.errors import ConfigError
from nfnets.errors import DataNotFoundError

IMAGENET_NAME = 'imagenet2012'
IMAGENET_NUM_CLASSES = 1000
IMAGENET_NUM_EXAMPLES = {'train': 1_281_167, 'validation': 50_000, 'test': 100_000}

SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_IMAGE_SIZE = 64
SYNTHETIC_NUM_EXAMPLES = {'train': 1024, 'validation': 256, 'test': 256}
# Each split draws from its own stream so that train and evaluation images differ.
_SYNTHETIC_SPLIT_STREAMS = {'train': 0, 'validation': 1, 'test': 2}

DATASET_NAMES = ('imagenet2012', 'digits', 'synthetic')
# 'tfds:oxford_flowers102' names any TFDS dataset with an 'image' and a class 'label' feature, prepared in
# array_record format (`tfds build oxford_flowers102 --file_format=array_record`).
TFDS_PREFIX = 'tfds:'


class DatasetInfo(NamedTuple):
  """What the rest of the code needs to know about a dataset before reading it."""
  num_classes: int
  num_examples: dict[str, int]


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Number of classes and examples per canonical split of `data_config.name`."""
  name = _checked_name(data_config)
  if name.startswith(TFDS_PREFIX):
    return _tfds_info(name[len(TFDS_PREFIX):], _tfds_data_dir(data_config))
  if name == 'imagenet2012':
    return DatasetInfo(IMAGENET_NUM_CLASSES, dict(IMAGENET_NUM_EXAMPLES))
  if name == 'digits':
    return DatasetInfo(digits.NUM_CLASSES, dict(digits.NUM_EXAMPLES))
  return DatasetInfo(SYNTHETIC_NUM_CLASSES, dict(SYNTHETIC_NUM_EXAMPLES))


def get_source(data_config: ml_collections.ConfigDict, split: str) -> Sequence[dict[str, Any]]:
  """A random-access source of `{'image': bytes, 'label': int}` for one split.

  Args:
    data_config: `config.data`; uses `name` and `data_dir` (None: the dataset's default).
    split: a TFDS split string ('train', 'validation', 'train[:10%]', ...); the synthetic
      source accepts 'train', 'validation' and 'test'.

  Raises:
    DataNotFoundError: ImageNet has not been prepared under the data directory.
    ValueError: unknown dataset or split.
  """
  name = _checked_name(data_config)
  data_dir = data_config.get('data_dir')
  if name == 'synthetic':
    if split not in SYNTHETIC_NUM_EXAMPLES:
      raise ConfigError(f'Unknown synthetic split {split!r}; use one of '
                       f'{sorted(SYNTHETIC_NUM_EXAMPLES)}.')
    return SyntheticSource(SYNTHETIC_NUM_EXAMPLES[split], stream=_SYNTHETIC_SPLIT_STREAMS[split])
  if name == 'digits':
    data_dir = digits.prepare(data_dir)
    return _tfds_source(digits.DATASET_NAME, split, data_dir)
  if name.startswith(TFDS_PREFIX):
    tfds_name, data_dir = name[len(TFDS_PREFIX):], _tfds_data_dir(data_config)
    _tfds_info(tfds_name, data_dir)  # the features must be an image and a class label
    return _tfds_source(tfds_name, split, data_dir)
  data_dir = os.path.expanduser(data_dir or imagenet_default_data_dir())
  _require_array_record(IMAGENET_NAME, data_dir)
  return _tfds_source(IMAGENET_NAME, split, data_dir)


def imagenet_default_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(
      os.path.expanduser('~'), 'tensorflow_datasets')


def _checked_name(data_config: ml_collections.ConfigDict) -> str:
  name = data_config.name
  if name not in DATASET_NAMES and not (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)):
    raise ConfigError(f'Unknown dataset {name!r} in config.data.name; use one of {DATASET_NAMES}, or '
                      f'{TFDS_PREFIX}NAME for a TFDS dataset prepared as array_record.')
  return name


def _tfds_data_dir(data_config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(data_config.get('data_dir') or imagenet_default_data_dir())


def _tfds_info(tfds_name: str, data_dir: str) -> DatasetInfo:
  """Classes and split sizes of a prepared TFDS dataset, read from its dataset_info.json."""
  import tensorflow_datasets as tfds  # Deferred: the synthetic source does without it.
  version_dir = _require_array_record(tfds_name, data_dir, prepare_hint=(
      f'prepare it with `tfds build {tfds_name} --data_dir {data_dir} --file_format=array_record`'))
  info = tfds.builder_from_directory(str(version_dir)).info
  names = set(info.features.keys())
  label = info.features['label'] if {'image', 'label'} <= names else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise ConfigError(f'{tfds_name} under {version_dir} is not an image classification dataset: it needs an '
                      f"'image' feature and a class 'label' feature, it has {sorted(names)}")
  return DatasetInfo(label.num_classes, {k: v.num_examples for k, v in info.splits.items()})


def _require_array_record(tfds_name: str, data_dir: str, prepare_hint: str | None = None) -> epath.Path:
  """The newest prepared version directory of `tfds_name` under `data_dir`, which must hold array_record files."""
  # epath, not glob: data_dir may be a bucket (gs://...) on cloud hosts.
  versions = sorted(str(p) for p in (epath.Path(data_dir) / tfds_name).glob('*/dataset_info.json'))
  prepare_hint = prepare_hint or (f'prepare it once with `python -m scripts.prepare_imagenet '
                                  f'--manual_dir DIR_WITH_ILSVRC2012_TARS --data_dir {data_dir}`')
  if not versions:
    raise DataNotFoundError(
        f'{tfds_name} not found under {data_dir} (set config.data.data_dir or $TFDS_DATA_DIR); '
        f'{prepare_hint}.')
  version_dir = epath.Path(versions[-1]).parent
  if not any(version_dir.glob('*.array_record-*')):
    raise DataNotFoundError(
        f'{tfds_name} under {version_dir} has no array_record files (prepared as TFRecord?); '
        f'{prepare_hint}.')
  return version_dir


def _tfds_source(tfds_name: str, split: str, data_dir: str) -> Sequence[dict[str, Any]]:
  import tensorflow_datasets as tfds  # Deferred: the synthetic source does without it.
  return tfds.data_source(
      tfds_name, split=split, data_dir=data_dir, download=False,
      decoders={'image': tfds.decode.SkipDecoding()})


class SyntheticSource(Sequence):
  """Deterministic PNG images with learnable labels, generated on demand.

  Class k is a striped pattern at angle k·180°/C in its own colour over mild noise; the stripe
  phase, frequency jitter and noise vary per example. Examples depend only on (stream, index),
  so the source needs no storage and pickles into data-loading workers.
  """

  def __init__(self, num_examples: int, *, stream: int = 0,
               num_classes: int = SYNTHETIC_NUM_CLASSES, image_size: int = SYNTHETIC_IMAGE_SIZE):
    if num_examples <= 0 or num_classes <= 0 or image_size <= 0:
      raise ValueError('SyntheticSource needs positive num_examples, num_classes and image_size.')
    self._num_examples = num_examples
    self._stream = stream
    self.num_classes = num_classes
    self.image_size = image_size

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -self._num_examples <= index < self._num_examples:
      raise IndexError(f'index {index} out of range for {self._num_examples} examples')
    index %= self._num_examples
    label = index % self.num_classes
    rng = np.random.default_rng([self._stream, index])
    return {'image': _encode_png(self._draw(label, rng)), 'label': label}

  def _draw(self, label: int, rng: np.random.Generator) -> np.ndarray:
    size = self.image_size
    angle = np.pi * label / self.num_classes
    frequency = (3.0 + rng.uniform(-0.5, 0.5)) * 2 * np.pi / size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    along = xs * np.cos(angle) + ys * np.sin(angle)
    stripes = 0.5 + 0.5 * np.sin(frequency * along + rng.uniform(0, 2 * np.pi))
    hue = label / self.num_classes
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    image = 30 + 200 * stripes[..., None] * colour + rng.normal(0, 8, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()
