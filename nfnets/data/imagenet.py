"""ImageNet (ILSVRC2012) as TFDS imagenet2012 in array_record: its identity and its one-time preparation.

`prepare(manual_dir, data_dir)` (the command: `python -m scripts.prepare_imagenet`) builds the dataset
from the archives downloaded from image-net.org: ILSVRC2012_img_train.tar (1000 per-synset tars inside)
and ILSVRC2012_img_val.tar (flat JPEGs); ILSVRC2012_img_test.tar is optional. A missing archive skips its
split. Full ImageNet needs ~150 GB free under the data directory.

TFDS's own imagenet2012 builder does the work, so the output is the standard dataset (same examples,
order, labels and JPEG bytes). That builder reaches for TensorFlow in a few places (`tf.io.gfile` for file
access, `tf.image` to re-encode 22 CMYK JPEGs and one PNG); when TensorFlow is not installed those calls
are routed to etils.epath and Pillow instead, so no TensorFlow is needed. With TensorFlow installed, TFDS
runs unmodified.
"""
import io
import os
import types
from typing import Optional

from etils import epath
from PIL import Image

from nfnets.data import sources
from nfnets.errors import DataNotFoundError

NAME = 'imagenet2012'
NUM_CLASSES = 1000
NUM_EXAMPLES = {'train': 1_281_167, 'validation': 50_000, 'test': 100_000}

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
TEST_TAR = 'ILSVRC2012_img_test.tar'

PREPARATION = ('prepare it once with `python -m scripts.prepare_imagenet --manual_dir DIR_WITH_ILSVRC2012_TARS '
               '--data_dir {data_dir}`')


def source(split: str, data_dir: Optional[str] = None) -> sources.Source:
  data_dir = os.path.expanduser(data_dir or sources.tfds_default_data_dir())
  sources.require_array_record(NAME, data_dir, PREPARATION.format(data_dir=data_dir))
  return sources.tfds_source(NAME, split, data_dir)


def _as_text(value: bytes | str) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else value


def _gfile(path, mode: str = 'r'):
  return epath.Path(path).open(mode)


def _gfile_exists(path) -> bool:
  return epath.Path(path).exists()


# Just the slice of the TensorFlow API that TFDS's imagenet2012 preparation touches.
_TF_SHIM = types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=types.SimpleNamespace(exists=_gfile_exists, GFile=_gfile)),
    compat=types.SimpleNamespace(as_text=_as_text),
)


def reencode_as_rgb_jpeg(image_bytes: bytes, quality: int = 100) -> bytes:
  """What TFDS's preparation does with tf.image to the CMYK JPEGs and the PNG among ImageNet's JPEGs."""
  # Pillow converts CMYK (including Adobe's inverted CMYK JPEGs) and PNG to RGB, as tf.image did.
  with Image.open(io.BytesIO(image_bytes)) as image:
    rgb = image.convert('RGB')
  buffer = io.BytesIO()
  rgb.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def tensorflow_available() -> bool:
  """Whether TensorFlow can be imported (then TFDS needs no help)."""
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def install_tensorflow_free_io() -> None:
  """Routes the TF calls of TFDS's imagenet2012 preparation to etils.epath and Pillow."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download import extractor
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  for module in (imagenet2012_dataset_builder, imagenet_common, extractor):
    module.tf = _TF_SHIM
  tfds.core.utils.jpeg_cmyk_to_rgb = reencode_as_rgb_jpeg
  tfds.core.utils.png_to_jpeg = reencode_as_rgb_jpeg


def prepare(manual_dir: str, data_dir: Optional[str] = None) -> str:
  """Builds imagenet2012 (array_record) from the tars in `manual_dir`; returns the data dir.

  Raises:
    DataNotFoundError: `manual_dir` holds neither the train nor the validation archive.
  """
  import tensorflow_datasets as tfds
  manual_dir = os.path.expanduser(manual_dir)
  if not any((epath.Path(manual_dir) / name).is_file() for name in (TRAIN_TAR, VAL_TAR)):
    raise DataNotFoundError(
        f'Neither {TRAIN_TAR} nor {VAL_TAR} is in --manual_dir={manual_dir}; download them from '
        'https://image-net.org/download-images into that directory.')
  data_dir = os.path.expanduser(data_dir or sources.tfds_default_data_dir())
  if not tensorflow_available():
    install_tensorflow_free_io()
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder
  builder = imagenet2012_dataset_builder.Builder(data_dir=data_dir)
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, try_download_gcs=False))
  return data_dir


DATASET = sources.register(sources.Dataset(
    name=NAME,
    num_classes=NUM_CLASSES,
    num_examples=NUM_EXAMPLES,
    source=source,
    preparation=PREPARATION,
    # The recipe's own defaults (configs/common.py's data_config) are ImageNet's.
    data_config={'train_split': 'train', 'eval_split': 'validation'},
))
