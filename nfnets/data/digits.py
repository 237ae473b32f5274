"""A small real dataset for CPU runs: scikit-learn's handwritten digits as a TFDS dataset.

The 1797 8x8 grey images of `sklearn.datasets.load_digits` (10 classes) are upscaled to RGB
(bicubic, `IMAGE_SIZE` pixels a side), encoded as PNG and written once, offline, in TFDS's
array_record format. The result is read with `tfds.data_source` exactly like ImageNet, so a tiny
run exercises the same input pipeline as a full one. Registered as `config.data.name='digits'`; the first
read prepares it.

The train/test split is fixed (stratified, seeded), so every machine builds identical splits.
Preparation writes into a private temporary directory and publishes the finished version
directory with one atomic rename: an interrupted build leaves nothing that looks complete, and
concurrent builders (e.g. several test processes) cannot corrupt each other.
"""
import io
import os
import shutil
import tempfile
import uuid

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nfnets.data import sources

NAME = 'digits'  # its config.data.name
DATASET_NAME = 'sklearn_digits'  # its TFDS name
VERSION = '1.0.0'
IMAGE_SIZE = 64
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
# Counts of the fixed stratified split of the 1797 images (checked by the tests).
NUM_EXAMPLES = {'train': 1437, 'test': 360}
DATA_DIR_ENV = 'NFNETS_DATA_DIR'


def default_data_dir() -> str:
  """Where the digits dataset lives unless the config says otherwise."""
  return os.environ.get(DATA_DIR_ENV) or os.path.join(
      os.path.expanduser('~'), '.cache', 'nfnets', 'tensorflow_datasets')


def _encode_png(grey_8x8: np.ndarray) -> bytes:
  # sklearn stores ink intensity in 0..16; stretch to the full byte range before resizing.
  grey = np.clip(np.round(grey_8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  image = Image.fromarray(grey, mode='L').resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
  buffer = io.BytesIO()
  image.convert('RGB').save(buffer, format='PNG')
  return buffer.getvalue()


def split_indices() -> dict[str, np.ndarray]:
  """The fixed stratified split: split name -> sorted indices into `load_digits()`."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  labels = load_digits().target
  train, test = train_test_split(
      np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
  return {'train': np.sort(train), 'test': np.sort(test)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits, upscaled to RGB PNGs."""

  VERSION = tfds.core.Version(VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='sklearn.datasets.load_digits upscaled to %dx%d RGB PNG.' % (
            IMAGE_SIZE, IMAGE_SIZE),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from scikit-learn's bundled copy: no download.
    return {name: self._generate_examples(indices) for name, indices in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits
    digits = load_digits()
    for index in indices:
      yield int(index), {
          'image': _encode_png(digits.images[index]),
          'label': int(digits.target[index]),
      }


def is_prepared(data_dir: str) -> bool:
  """Whether a complete copy of the dataset is published under `data_dir` (local or e.g. gs://)."""
  return (epath.Path(data_dir) / DATASET_NAME / VERSION / 'dataset_info.json').exists()


def prepare(data_dir: str | None = None) -> str:
  """Builds the dataset under `data_dir` unless it is already there; returns the data dir.

  Safe to call from several processes at once: each builds privately and the first to finish
  publishes its copy; the others discard theirs. A remote `data_dir` gets a copy of a local build, its
  dataset_info.json (what `is_prepared` looks for) last.
  """
  data_dir = str(data_dir or default_data_dir())
  remote = '://' in data_dir
  if not remote:
    data_dir = os.path.expanduser(data_dir)
  if is_prepared(data_dir):
    return data_dir
  target = epath.Path(data_dir) / DATASET_NAME / VERSION
  target.parent.mkdir(parents=True, exist_ok=True)
  # Locally, build next to the target so that publishing is one atomic rename.
  scratch = tempfile.mkdtemp(prefix=f'.{DATASET_NAME}-building-{uuid.uuid4().hex[:8]}-',
                             dir=None if remote else data_dir)
  try:
    builder = SklearnDigits(data_dir=scratch)
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    built = epath.Path(scratch) / DATASET_NAME / VERSION
    if remote:
      files = sorted(built.iterdir(), key=lambda f: f.name == 'dataset_info.json')
      target.mkdir(parents=True, exist_ok=True)
      for file in files:
        file.copy(target / file.name, overwrite=True)
      return data_dir
    try:
      os.rename(built, target)
    except OSError:
      # Another process published first; its copy is identical, so ours is redundant.
      if not is_prepared(data_dir):
        raise
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return data_dir


def source(split: str, data_dir: str | None = None) -> sources.Source:
  """The split (a TFDS split string), preparing the dataset first if this is its first use."""
  return sources.tfds_source(DATASET_NAME, split, prepare(data_dir))


DATASET = sources.register(sources.Dataset(
    name=NAME,
    num_classes=NUM_CLASSES,
    num_examples=NUM_EXAMPLES,
    source=source,
    preparation=f'nothing to do: built from scikit-learn\'s copy on first use (under ${DATA_DIR_ENV} or '
                '~/.cache/nfnets/tensorflow_datasets unless config.data.data_dir says otherwise)',
    data_config={
        'train_split': 'train',
        'eval_split': 'test',
        'crop_min_area': 0.6,
        'flip': False,           # a mirrored digit is a different symbol
        'mix': 'none',
    },
))
