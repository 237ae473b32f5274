"""Tests for nfnets.data.randaugment: every op at magnitudes 0-15 on a real photo, the table, and the
reference's Solarize and Contrast against the corrected ones."""
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from sklearn.datasets import load_sample_image

from nfnets.data import randaugment as ra


@pytest.fixture(scope='module')
def photo() -> np.ndarray:
  # Odd sizes catch height/width mix-ups.
  return np.asarray(Image.fromarray(load_sample_image('flower.jpg')).resize((211, 160)))


def _rng(seed=0):
  return np.random.default_rng(seed)


@pytest.mark.parametrize('name', ra.OPS)
@pytest.mark.parametrize('magnitude', [0, 10, 15])
def test_every_op_keeps_shape_and_dtype(photo, name, magnitude):
  out = ra.apply_op(photo, name, magnitude, _rng())
  assert out.shape == photo.shape and out.dtype == np.uint8


@pytest.mark.parametrize('name', ['Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY',
                                  'Cutout', 'SolarizeAdd'])
def test_magnitude_zero_is_identity_for_geometric_and_additive_ops(photo, name):
  np.testing.assert_array_equal(ra.apply_op(photo, name, 0, _rng()), photo)


@pytest.mark.parametrize('name', ['Color', 'Contrast', 'Brightness', 'Sharpness'])
def test_enhance_ops_are_identity_at_five_and_match_pillow_at_zero_and_ten(photo, name):
  # The reference maps M to factor 1.8 M / 10 + 0.1, so M = 5 is the identity, not M = 0.
  # Color and Sharpness blend towards TF's degenerate images, which truncate where Pillow's round
  # (exact rules: test_randaugment_tf_rules.py): within one level of Pillow's up to M = 10.
  np.testing.assert_array_equal(ra.apply_op(photo, name, 5, _rng()), photo)
  enhancer = getattr(ImageEnhance, name)(Image.fromarray(photo))
  tolerance = 1 if name in ('Color', 'Sharpness') else 0
  for magnitude, factor in [(0, 0.1), (10, 1.9)]:
    out = ra.apply_op(photo, name, magnitude, _rng(), semantics='corrected')
    expected = np.asarray(enhancer.enhance(factor))
    assert np.abs(out.astype(np.int16) - expected).max() <= tolerance
    assert not np.array_equal(out, photo)


def test_invert_auto_contrast_and_equalize(photo):
  np.testing.assert_array_equal(ra.apply_op(photo, 'Invert', 10, _rng()), 255 - photo)
  low_contrast = (photo // 2 + 40).astype(np.uint8)
  stretched = ra.apply_op(low_contrast, 'AutoContrast', 10, _rng())
  assert (stretched.reshape(-1, 3).min(0) == 0).all() and (stretched.reshape(-1, 3).max(0) == 255).all()
  expected = np.asarray(ImageOps.autocontrast(Image.fromarray(low_contrast)), np.int16)
  assert np.abs(stretched.astype(np.int16) - expected).max() <= 1
  np.testing.assert_array_equal(ra.apply_op(photo, 'Equalize', 0, _rng()),
                                np.asarray(ImageOps.equalize(Image.fromarray(photo))))
  flat = np.full((8, 8, 3), 77, np.uint8)
  np.testing.assert_array_equal(ra.apply_op(flat, 'AutoContrast', 5, _rng()), flat)
  np.testing.assert_array_equal(ra.apply_op(flat, 'Equalize', 5, _rng()), flat)


def test_posterize_keeps_the_table_bit_count(photo):
  np.testing.assert_array_equal(ra.apply_op(photo, 'Posterize', 10, _rng()), photo & 0xF0)
  np.testing.assert_array_equal(ra.apply_op(photo, 'Posterize', 5, _rng()), photo & 0xC0)
  # int(4 * 0 / 10) = 0 bits; TF clamps the shift to 7 so one bit survives.
  np.testing.assert_array_equal(ra.apply_op(photo, 'Posterize', 0, _rng()), photo & 0x80)
  np.testing.assert_array_equal(ra.apply_op(photo, 'Posterize', 25, _rng()), photo)


@pytest.mark.parametrize('semantics,magnitude,inverted_from', [
    ('reference', 0, 0), ('reference', 5, 128), ('reference', 10, 0), ('reference', 15, 128),
    ('corrected', 0, 0), ('corrected', 5, 128), ('corrected', 10, 256), ('corrected', 15, 256)])
def test_solarize_thresholds(photo, semantics, magnitude, inverted_from):
  # The reference cast int(256 M / 10) to uint8: 256 wraps to 0 (all inverted), 384 to 128.
  out = ra.apply_op(photo, 'Solarize', magnitude, _rng(), semantics=semantics)
  np.testing.assert_array_equal(out, np.where(photo < inverted_from, photo, 255 - photo))


@pytest.mark.parametrize('side,grey', [(192, 144), (224, 196), (256, 255), (300, 255)])
@pytest.mark.parametrize('magnitude', [0, 10, 15])
def test_reference_contrast_blends_towards_pixel_count_over_256(side, grey, magnitude):
  # Its "mean" was the grey histogram's sum (the pixel count) / 256 bins, clipped to 255.
  image = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
  factor = np.float32(1.8 * magnitude / 10 + 0.1)
  blended = np.float32(grey) + factor * (image.astype(np.float32) - np.float32(grey))
  expected = np.clip(blended, 0, 255).astype(np.uint8)  # TF's blend truncates
  np.testing.assert_array_equal(ra.apply_op(image, 'Contrast', magnitude, _rng()), expected)
  corrected = ra.apply_op(image, 'Contrast', magnitude, _rng(), semantics='corrected')
  mean_grey = np.asarray(Image.fromarray(image).convert('L'), np.float64).mean()
  assert abs(mean_grey - grey) > 10 and not np.array_equal(corrected, expected)
  np.testing.assert_array_equal(ra.apply_op(image, 'Contrast', 5, _rng()), image)


def test_solarize_add_adds_110_below_128(photo):
  out = ra.apply_op(photo, 'SolarizeAdd', 10, _rng())
  expected = np.where(photo < 128, np.minimum(photo.astype(np.int32) + 110, 255), photo)
  np.testing.assert_array_equal(out, expected)


def test_cutout_fills_a_grey_square_of_the_table_size(photo):
  big = np.zeros((300, 300, 3), np.uint8)
  out = ra.apply_op(big, 'Cutout', 10, _rng(3))
  twin = _rng(3)
  center_y, center_x = twin.integers(0, 300), twin.integers(0, 300)
  top, left = max(0, center_y - 40), max(0, center_x - 40)
  bottom, right = min(300, center_y + 40), min(300, center_x + 40)
  filled = (out == 128).all(axis=-1)
  assert filled[top:bottom, left:right].all()
  assert filled.sum() == (bottom - top) * (right - left)
  assert filled.sum() <= 80 * 80


def test_translate_moves_by_100_pixels_and_fills_grey(photo):
  width = photo.shape[1]
  out = ra.apply_op(photo, 'TranslateX', 10, _rng())
  if (out[:, :100] == 128).all():
    np.testing.assert_array_equal(out[:, 100:], photo[:, :width - 100])
  else:
    np.testing.assert_array_equal(out[:, :width - 100], photo[:, 100:])
    assert (out[:, width - 100:] == 128).all()
  out_y = ra.apply_op(photo, 'TranslateY', 10, _rng())
  assert (out_y == 128).all(axis=-1).sum() == 100 * width


def test_rotate_fills_corners_and_shear_slants_the_image(photo):
  out = ra.apply_op(photo, 'Rotate', 10, _rng())
  assert all((c == 128).all() for c in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]))
  # ShearX maps output (x, y) to input (x + 0.3 y, y): row 0 is kept, the last row moves by
  # 0.3 * (H - 1) pixels, leaving that many grey pixels at one end.
  height, width = photo.shape[:2]
  sheared = ra.apply_op(photo, 'ShearX', 10, _rng())
  np.testing.assert_array_equal(sheared[0], photo[0])
  assert abs((sheared[-1] == 128).all(axis=-1).sum() - 0.3 * (height - 1)) <= 1
  sheared_y = ra.apply_op(photo, 'ShearY', 10, _rng())
  np.testing.assert_array_equal(sheared_y[:, 0], photo[:, 0])
  assert abs((sheared_y[:, -1] == 128).all(axis=-1).sum() - 0.3 * (width - 1)) <= 1


def test_level_table_follows_the_reference():
  rng = _rng()
  assert abs(ra.LEVEL_TO_ARG['Rotate'](10, rng)) == 30
  assert abs(ra.LEVEL_TO_ARG['ShearX'](5, rng)) == pytest.approx(0.15)
  assert abs(ra.LEVEL_TO_ARG['TranslateY'](10, rng)) == 100
  assert ra.LEVEL_TO_ARG['Posterize'](5, rng) == 2
  assert ra.LEVEL_TO_ARG['Solarize'](5, rng) == 128
  assert ra.LEVEL_TO_ARG['SolarizeAdd'](10, rng) == 110
  assert ra.LEVEL_TO_ARG['Cutout'](5, rng) == 20
  assert ra.LEVEL_TO_ARG['Contrast'](10, rng) == pytest.approx(1.9)
  signs = {np.sign(ra.LEVEL_TO_ARG['Rotate'](10, rng)) for _ in range(50)}
  assert signs == {-1.0, 1.0}


def test_randaugment_layers_and_determinism(photo):
  np.testing.assert_array_equal(ra.randaugment(photo, _rng(), 0, 10), photo)
  first = ra.randaugment(photo, _rng(7), 4, 10)
  np.testing.assert_array_equal(first, ra.randaugment(photo, _rng(7), 4, 10))
  assert first.shape == photo.shape and first.dtype == np.uint8
  # Ops are drawn uniformly: with 1 layer and many seeds, different ops give many distinct outputs.
  small = photo[:32, :32]
  outputs = {ra.randaugment(small, _rng(seed), 1, 10).tobytes() for seed in range(80)}
  assert len(outputs) >= 14


def test_randaugment_rejects_bad_input(photo):
  with pytest.raises(ValueError, match='uint8'):
    ra.randaugment(photo.astype(np.float32), _rng(), 2, 5)
  with pytest.raises(ValueError, match='num_layers'):
    ra.randaugment(photo, _rng(), -1, 5)
  with pytest.raises(ValueError, match='Unknown RandAugment op'):
    ra.apply_op(photo, 'Blur', 5, _rng())
  with pytest.raises(ValueError, match='semantics'):
    ra.randaugment(photo, _rng(), 2, 5, semantics='tf')


def test_lookup_matches_pillow_point(photo):
  image = Image.fromarray(photo)
  per_band = list(np.random.default_rng(0).integers(0, 256, 768))
  per_band = [int(v) for v in per_band]
  np.testing.assert_array_equal(np.asarray(ra._lookup(image, per_band)),
                                np.asarray(image.point(per_band)))
  shared = tuple(range(255, -1, -1))
  np.testing.assert_array_equal(np.asarray(ra._lookup(image, shared)), 255 - photo)
