"""nfnets.data.train_transform: the order of the reference's steps and what each step receives."""
import io

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from nfnets.data import mix
from nfnets.data import ops_image
from nfnets.data import randaugment
from nfnets.data import train_transform

RES = 40
NUM_CLASSES = 6


@pytest.fixture(scope='module')
def examples():
  encoded = []
  for index, name in enumerate(('china.jpg', 'flower.jpg')):
    buffer = io.BytesIO()
    Image.fromarray(load_sample_image(name)).resize((160, 107)).save(buffer, 'JPEG', quality=85)
    encoded.append({'image': buffer.getvalue(), 'label': 2 * index + 1})
  return tuple(encoded)


def _transform(**overrides):
  settings = dict(resolution=RES, num_classes=NUM_CLASSES, per_device=4)
  settings.update(overrides)
  return train_transform.TrainTransform(**settings)


@pytest.mark.parametrize('position', [0, 3])
def test_example_is_two_full_resolution_crops_mixed_as_floats_then_truncated(examples, position):
  out = _transform()(examples, position, np.random.default_rng(6))
  rng = np.random.default_rng(6)  # Replays the steps with the same draws.
  crops = [ops_image.decode_random_resized_crop(e['image'], rng, RES, random_flip=True)
           for e in examples]
  targets = mix.one_hot(np.array([1, 3]), NUM_CLASSES)
  mixed, target = mix.mix_pair(crops, targets, use_cutmix=position >= 2, rng=rng)
  assert out['image'].dtype == np.uint8 and out['image'].shape == (RES, RES, 3)
  np.testing.assert_array_equal(out['image'], ops_image.to_uint8(mixed))
  np.testing.assert_array_equal(out['targets'], target)
  assert 0 < target[1] < 1 and target[1] + target[3] == pytest.approx(1)


def test_randaugment_receives_the_clipped_truncated_uint8_mix(examples, monkeypatch):
  # Values a rounding or unclipped conversion would change: the reference clips, then truncates.
  mixed = np.array([-7.5, 0.4, 10.999, 127.5, 254.99, 300.0], np.float32)
  mixed = np.tile(mixed.repeat(3).reshape(6, 1, 3), (1, 6, 1))  # [6, 6, 3]
  monkeypatch.setattr(train_transform.mix, 'mix_pair',
                      lambda images, targets, *args: (mixed, targets[0]))
  seen = []

  def record(image, rng, num_layers, magnitude, semantics):
    seen.append((image.copy(), num_layers, magnitude, semantics))
    return 255 - image

  monkeypatch.setattr(train_transform.randaugment, 'randaugment', record)
  out = _transform(randaugment_layers=4, randaugment_magnitude=15.0,
                   randaugment_semantics='corrected')(examples, 0, np.random.default_rng(0))
  (image, num_layers, magnitude, semantics), = seen
  assert image.dtype == np.uint8 and image.shape == (6, 6, 3)
  np.testing.assert_array_equal(image[:, 0, 0], [0, 0, 10, 127, 254, 255])
  assert (num_layers, magnitude, semantics) == (4, 15.0, 'corrected')
  np.testing.assert_array_equal(out['image'], 255 - image)


def test_randaugment_before_mixing_gets_each_uint8_crop(examples, monkeypatch):
  seen = []

  def record(image, rng, *args):
    seen.append(image)
    return np.zeros_like(image)

  monkeypatch.setattr(train_transform.randaugment, 'randaugment', record)
  out = _transform(randaugment_layers=2, randaugment_after_mix=False)(
      examples, 1, np.random.default_rng(0))
  assert len(seen) == 2 and all(x.dtype == np.uint8 and x.shape == (RES, RES, 3) for x in seen)
  np.testing.assert_array_equal(out['image'], 0)  # mixed from the augmented crops


def test_without_mixing_an_example_is_one_crop(examples):
  transform = _transform(mix_mode='none', flip=False)
  assert transform.crops_per_example == 1
  out = transform(examples[:1], 2, np.random.default_rng(1))
  crop = ops_image.decode_random_resized_crop(examples[0]['image'], np.random.default_rng(1), RES)
  np.testing.assert_array_equal(out['image'], ops_image.to_uint8(crop))
  np.testing.assert_array_equal(out['targets'], np.eye(NUM_CLASSES)[1])
  with pytest.raises(ValueError, match='Expected 1 source examples'):
    transform(examples, 0, np.random.default_rng(1))


def test_real_randaugment_runs_in_both_semantics(examples):
  for semantics in randaugment.SEMANTICS:
    out = _transform(randaugment_layers=3, randaugment_magnitude=10.0,
                     randaugment_semantics=semantics)(examples, 0, np.random.default_rng(2))
    assert out['image'].dtype == np.uint8 and out['image'].shape == (RES, RES, 3)


def test_bad_settings_and_labels_are_rejected(examples):
  with pytest.raises(ValueError, match='config.data.mix'):
    _transform(mix_mode='cutout')
  with pytest.raises(ValueError, match='randaugment_semantics'):
    _transform(randaugment_semantics='tf')
  with pytest.raises(ValueError, match='positive'):
    _transform(per_device=0)
  with pytest.raises(ValueError, match='Labels must lie'):
    _transform(num_classes=2)(examples, 0, np.random.default_rng(0))
