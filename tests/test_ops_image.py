"""Tests for nfnets.data.ops_image: decoding, crop geometry, draft decode, eval resize, normalise."""
import io

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from nfnets.data import ops_image


@pytest.fixture(scope='module')
def china() -> np.ndarray:
  return load_sample_image('china.jpg')


def _encode(image: Image.Image, fmt: str = 'JPEG', **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


@pytest.mark.parametrize('mode,fmt', [('RGB', 'JPEG'), ('L', 'JPEG'), ('CMYK', 'JPEG'),
                                      ('RGBA', 'PNG'), ('P', 'PNG')])
def test_decoders_return_rgb_uint8_for_every_mode(china, mode, fmt):
  data = _encode(Image.fromarray(china).convert(mode), fmt)
  decoded = ops_image.decode_image(data)
  assert decoded.shape == china.shape and decoded.dtype == np.uint8
  crop = ops_image.decode_random_resized_crop(data, np.random.default_rng(0), 64)
  assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8


def test_undecodable_bytes_raise_one_clear_error():
  with pytest.raises(ValueError, match='Cannot decode image'):
    ops_image.decode_image(b'not an image')
  with pytest.raises(TypeError, match='encoded image bytes'):
    ops_image.decode_image(np.zeros((4, 4, 3), np.uint8))


def test_sampled_boxes_respect_area_aspect_and_bounds():
  rng = np.random.default_rng(0)
  height, width = 375, 500
  areas = []
  for _ in range(500):
    box = ops_image.sample_distorted_box(height, width, rng)
    assert box is not None
    top, left, crop_h, crop_w = box
    assert 0 <= top and top + crop_h <= height and 0 <= left and left + crop_w <= width
    area = crop_h * crop_w / (height * width)
    # min_object_covered = 0.1 is the binding lower bound (tighter than area_range's 0.08).
    assert 0.1 <= area <= 1.0
    # Width is round(height * aspect): the aspect can miss the range by half a pixel of width.
    assert 3 / 4 - 0.5 / crop_h <= crop_w / crop_h <= 4 / 3 + 0.5 / crop_h
    areas.append(area)
  assert min(areas) < 0.2 and max(areas) > 0.8


def test_impossible_boxes_fall_back_to_the_reference_centre_crop():
  # A 1:40 strip cannot hold a 3/4..4/3 box covering 10 % of it.
  rng = np.random.default_rng(0)
  assert ops_image.sample_distorted_box(10, 400, rng) is None
  box = ops_image.random_resized_crop_box(10, 400, rng, size=192)
  assert box == ops_image.center_fallback_box(10, 400, 192)
  # Side int(min(H, W) * size / (size + 32)); offsets (H - side + 1) // 2.
  assert ops_image.center_fallback_box(375, 500, 192) == (27, 90, 321, 321)
  assert ops_image.center_fallback_box(10, 400, 192) == (1, 196, 8, 8)


def test_whole_image_samples_are_treated_as_failures():
  # area_range (1, 1) with aspect exactly W/H can only return the whole image.
  box = ops_image.random_resized_crop_box(300, 400, np.random.default_rng(0), size=100,
                                          area_range=(1.0, 1.0), aspect_range=(4 / 3, 4 / 3))
  assert box == ops_image.center_fallback_box(300, 400, 100)


def test_bad_crop_ranges_are_rejected():
  with pytest.raises(ValueError, match='area_range'):
    ops_image.random_resized_crop_box(100, 100, np.random.default_rng(0), 32, area_range=(0.5, 2))
  with pytest.raises(ValueError, match='size'):
    ops_image.decode_random_resized_crop(b'', np.random.default_rng(0), 0)


def test_draft_decode_is_used_and_matches_full_decode(china):
  large = Image.fromarray(china).resize((1600, 1068), Image.BICUBIC)
  data = _encode(large, quality=95)
  box = (100, 200, 900, 1000)  # 900x1000 crop to 112: DCT scale 8 applies.
  lazily_opened = Image.open(io.BytesIO(data))
  drafted = ops_image.crop_and_resize(lazily_opened, box, 112).astype(np.float32)
  assert lazily_opened.size == (200, 134)
  full = Image.fromarray(ops_image.decode_image(data))
  top, left, crop_h, crop_w = box
  reference = np.asarray(full.resize((112, 112), Image.BICUBIC,
                                     box=(left, top, left + crop_w, top + crop_h)), np.float32)
  assert np.abs(drafted - reference).mean() < 3.0
  # Misplacing the box by a few source pixels would show: compare with a shifted crop.
  shifted = np.asarray(full.resize((112, 112), Image.BICUBIC,
                                   box=(left + 40, top, left + crop_w + 40, top + crop_h)), np.float32)
  assert np.abs(drafted - reference).mean() < 0.5 * np.abs(drafted - shifted).mean()


def test_random_flip_mirrors_about_half_the_time(china):
  rng = np.random.default_rng(0)
  outcomes = []
  for _ in range(40):
    flipped = ops_image.random_flip(china, rng)
    if np.array_equal(flipped, china):
      outcomes.append(False)
    else:
      np.testing.assert_array_equal(flipped, china[:, ::-1])
      outcomes.append(True)
  assert 8 <= sum(outcomes) <= 32


@pytest.mark.parametrize('shape', [(288, 288), (224, 224), (544, 544), (480, 720), (50, 90)])
def test_bicubic_resize_matches_jax_non_antialiased(china, shape):
  ours = ops_image.tf_bicubic_resize(china, *shape)
  expected = np.asarray(jax.image.resize(china.astype(np.float32), shape + (3,), 'bicubic',
                                         antialias=False))
  assert ours.dtype == np.float32 and ours.shape == shape + (3,)
  # jax matches TensorFlow within 0.17 max on 0-255; we match jax far tighter.
  assert np.abs(ours - expected).max() < 0.05


def test_eval_resize_and_crop_geometry_and_values(china):
  for resolution, margin in [(256, 32), (224, 33), (64, 0)]:
    out = ops_image.eval_resize_and_crop(china, resolution, margin)
    assert out.shape == (resolution, resolution, 3) and out.dtype == np.float32
    full = resolution + margin
    offset = (margin + 1) // 2
    whole = np.asarray(jax.image.resize(china.astype(np.float32), (full, full, 3), 'bicubic',
                                        antialias=False))
    np.testing.assert_allclose(out, whole[offset:offset + resolution, offset:offset + resolution],
                               atol=0.05)
  # Bicubic overshoot is kept, as in the reference.
  out = ops_image.eval_resize_and_crop(china, 256)
  assert out.min() < 0 or out.max() > 255


def test_eval_resize_rejects_bad_arguments(china):
  with pytest.raises(ValueError, match='resolution'):
    ops_image.eval_resize_and_crop(china, 0)
  with pytest.raises(ValueError, match='HWC RGB'):
    ops_image.eval_resize_and_crop(china[..., 0], 64)


def test_normalize_uses_imagenet_statistics():
  pixels = np.array([[[0.485 * 255, 0.456 * 255, 0.406 * 255], [255, 255, 255]]], np.float32)
  out = ops_image.normalize(pixels.astype(np.uint8))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], 0, atol=0.02)
  np.testing.assert_allclose(out[0, 1], (1 - np.array([0.485, 0.456, 0.406]))
                             / np.array([0.229, 0.224, 0.225]), rtol=1e-5)
  with pytest.raises(ValueError, match='RGB'):
    ops_image.normalize(np.zeros((2, 2, 4)))


@pytest.mark.parametrize('shape', [(3,), (5, 3), (2, 7, 5, 3), (2, 2, 4, 5, 3), (0, 4, 3)])
def test_normalize_is_exactly_subtract_mean_then_scale(shape):
  # The row-tiled in-place version must give bit-identical results to the plain broadcast formula.
  pixels = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
  expected = (pixels.astype(np.float32) - ops_image.MEAN_RGB) * ops_image._INV_STDDEV_RGB
  out = ops_image.normalize(pixels)
  assert out.dtype == np.float32 and out.shape == shape
  np.testing.assert_array_equal(out, expected)
  if len(shape) >= 3:  # Non-contiguous and float inputs take the same path.
    view = pixels[:, ::-1]
    np.testing.assert_array_equal(ops_image.normalize(view), expected[:, ::-1])
    np.testing.assert_array_equal(ops_image.normalize(pixels.astype(np.float64)), expected)


def test_random_flip_handles_other_dtypes_and_channel_counts(china):
  for image in (china.astype(np.float32), china[..., :2], np.dstack([china, china[..., :1]])):
    rng = np.random.default_rng(0)
    results = [ops_image.random_flip(image, rng) for _ in range(10)]
    assert any(np.array_equal(r, image[:, ::-1]) for r in results)
    for result in results:
      assert result.dtype == image.dtype and result.shape == image.shape
      assert np.array_equal(result, image) or np.array_equal(result, image[:, ::-1])
