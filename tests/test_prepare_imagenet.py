"""ImageNet's preparation (nfnets.data.imagenet, the work of scripts/prepare_imagenet.py) on a tiny fake
ILSVRC2012 laid out like the real archives."""
import io
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from nfnets.data import sources
from nfnets.data import imagenet

SYNSETS = ('n01440764', 'n01443537', 'n01739381')
# TFDS re-encodes this known CMYK file of the real train set; the fake one is CMYK too.
CMYK_NAME = 'n01739381_1309.JPEG'
NUM_VAL = 5


def _jpeg(rng, mode='RGB'):
  pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
  image = Image.fromarray(pixels).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def _make_fake_archives(manual_dir):
  rng = np.random.default_rng(0)
  train_images = {}
  with tarfile.open(manual_dir / imagenet.TRAIN_TAR, 'w') as outer:
    for synset in SYNSETS:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        names = [f'{synset}_{k}.JPEG' for k in (1, 2)]
        if synset == CMYK_NAME.split('_')[0]:
          names[0] = CMYK_NAME
        for name in names:
          train_images[name] = _jpeg(rng, 'CMYK' if name == CMYK_NAME else 'RGB')
          _add(inner, name, train_images[name])
      _add(outer, f'{synset}.tar', inner_bytes.getvalue())
  val_images = {}
  # TFDS labels validation images by their position in sorted order, so the fake val set must
  # hold the first names; writing them unsorted checks that the sorting is TFDS's, not ours.
  with tarfile.open(manual_dir / imagenet.VAL_TAR, 'w') as val:
    for k in reversed(range(1, NUM_VAL + 1)):
      name = f'ILSVRC2012_val_{k:08d}.JPEG'
      val_images[name] = _jpeg(rng)
      _add(val, name, val_images[name])
  return train_images, val_images


def _tfds_label_names():
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  with open(imagenet_common.label_names_file()) as f:
    return f.read().split()


def _validation_label_lines():
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  path = os.path.join(os.path.dirname(imagenet_common.__file__), 'validation_labels.txt')
  with open(path) as f:
    return f.read().split()


def test_prepares_fake_imagenet_and_reads_it_back(tmp_path):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  train_images, val_images = _make_fake_archives(manual_dir)
  data_dir = imagenet.prepare(str(manual_dir), str(tmp_path / 'tfds'))

  config = ml_collections.ConfigDict({'name': 'imagenet2012', 'data_dir': data_dir})
  label_names = _tfds_label_names()
  train = sources.get_source(config, 'train')
  assert len(train) == len(train_images)
  seen = set()
  for index in range(len(train)):
    example = train[index]
    name = example['file_name'].decode()
    seen.add(name)
    assert label_names[example['label']] == name.split('_')[0]
    decoded = Image.open(io.BytesIO(example['image']))
    assert decoded.format == 'JPEG' and decoded.mode == 'RGB'
    if name != CMYK_NAME:
      assert example['image'] == train_images[name]  # Stored untouched, crop-before-decode ready.
  assert seen == set(train_images)

  validation = sources.get_source(config, 'validation')
  assert len(validation) == NUM_VAL
  expected_synsets = _validation_label_lines()[:NUM_VAL]
  for index in range(NUM_VAL):
    example = validation[index]
    name = example['file_name'].decode()
    position = int(name[len('ILSVRC2012_val_'):-len('.JPEG')]) - 1
    assert label_names[example['label']] == expected_synsets[position]
    assert example['image'] == val_images[name]


def test_missing_archives_give_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar nor'):
    imagenet.prepare(str(tmp_path), str(tmp_path / 'tfds'))


def test_reencoding_turns_cmyk_into_rgb_jpeg():
  cmyk = _jpeg(np.random.default_rng(1), 'CMYK')
  assert Image.open(io.BytesIO(cmyk)).mode == 'CMYK'
  fixed = Image.open(io.BytesIO(imagenet.reencode_as_rgb_jpeg(cmyk)))
  assert (fixed.format, fixed.mode) == ('JPEG', 'RGB')
