"""Tests for nfnets.data.ops_image: decoding and eval preprocessing against TensorFlow's outputs,
crop geometry, training crops, uint8 conversion, normalise."""
import io

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

import nfnets.data
from nfnets.data import bicubic
from nfnets.data import ops_image
from tests import tf_fixtures

FIXTURES = range(tf_fixtures.num_images())


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
  assert crop.shape == (64, 64, 3) and crop.dtype == np.float32
  assert ops_image.eval_image(data, 48).shape == (48, 48, 3)


@pytest.mark.parametrize('index', FIXTURES)
def test_jpeg_decoding_equals_tensorflow_bit_for_bit(index):
  np.testing.assert_array_equal(ops_image.decode_image(tf_fixtures.jpeg(index)),
                                tf_fixtures.get('decoded', index))


def test_pillow_decoding_is_not_tensorflow():
  # Pillow's accurate IDCT (ISLOW) is what the decoder above replaces: about 1 level off on average.
  differences = [np.abs(np.asarray(Image.open(io.BytesIO(tf_fixtures.jpeg(i))).convert('RGB'),
                                   np.int16) - tf_fixtures.get('decoded', i)) for i in FIXTURES]
  assert max(d.max() for d in differences) >= 2
  assert np.mean([d.mean() for d in differences]) > 0.5


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


def test_jpegs_libjpeg_turbo_refuses_fall_back_to_pillow(china):
  # Stray bytes before a marker: libjpeg-turbo (strict) refuses, Pillow decodes.
  data = _encode(Image.fromarray(china))
  marker = data.index(b'\xff\xda')
  data = data[:marker] + b'\x00\x00' + data[marker:]
  expected = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  np.testing.assert_array_equal(ops_image.decode_image(data), expected)
  with pytest.raises(ValueError, match='Cannot decode image'):
    ops_image.decode_image(b'\xff\xd8 truncated jpeg')


@pytest.mark.parametrize('index', FIXTURES)
def test_training_crop_resize_equals_tensorflow_on_the_decoded_crop(index):
  # The fixture boxes include shrinking and enlarging crops, with and without the flip.
  box = tuple(int(v) for v in tf_fixtures.get('train_box', index))
  ours = ops_image.crop_and_resize(ops_image.decode_image(tf_fixtures.jpeg(index)), box,
                                   tf_fixtures.setting('train_resolution'),
                                   mirror=bool(tf_fixtures.get('train_flip', index)))
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, tf_fixtures.get('train', index))


@pytest.mark.parametrize('index', FIXTURES)
def test_full_decode_crops_differ_from_tf_cropped_decode_only_in_edge_columns(index):
  # What still differs from the reference: its decode_and_crop_jpeg upsamples subsampled chroma as
  # if the window's left and right edges were the image's; cropping a full decode does not.
  top, left, height, width = (int(v) for v in tf_fixtures.get('train_box', index))
  ours = ops_image.decode_image(tf_fixtures.jpeg(index))[top:top + height, left:left + width]
  reference = tf_fixtures.get('cropped_decode', index)
  np.testing.assert_array_equal(ours[:, 1:-1], reference[:, 1:-1])
  assert np.abs(ours.astype(int) - reference).max() <= 8


def test_training_crops_are_the_sampled_box_resized_and_flipped_half_the_time(china):
  data = _encode(Image.fromarray(china), quality=90)
  decoded = ops_image.decode_image(data)
  flips = 0
  for seed in range(16):
    crop = ops_image.decode_random_resized_crop(data, np.random.default_rng(seed), 48,
                                                random_flip=True)
    rng = np.random.default_rng(seed)  # Replays the draws: the box, then the flip.
    box = ops_image.random_resized_crop_box(*decoded.shape[:2], rng, 48)
    mirror = rng.random() < 0.5
    flips += mirror
    np.testing.assert_array_equal(crop, ops_image.crop_and_resize(decoded, box, 48, mirror))
    if not mirror:
      np.testing.assert_array_equal(
          crop, ops_image.decode_random_resized_crop(data, np.random.default_rng(seed), 48))
  assert 3 <= flips <= 13


def test_to_uint8_clips_then_truncates():
  values = np.array([-3.5, -0.2, 0.0, 10.999, 127.5, 254.99, 255.0, 300.2], np.float32)
  np.testing.assert_array_equal(ops_image.to_uint8(values), [0, 0, 0, 10, 127, 254, 255, 255])
  assert ops_image.to_uint8(values).dtype == np.uint8


def test_eval_resize_and_crop_is_the_centre_of_the_whole_resize(china):
  for resolution, margin in [(256, 32), (224, 33), (64, 0)]:
    out = ops_image.eval_resize_and_crop(china, resolution, margin)
    assert out.shape == (resolution, resolution, 3) and out.dtype == np.float32
    full = resolution + margin
    offset = (margin + 1) // 2
    whole = bicubic.resize(china, full, full)
    np.testing.assert_array_equal(
        out, whole[offset:offset + resolution, offset:offset + resolution])
  # Bicubic overshoot is kept, as in the reference.
  out = ops_image.eval_resize_and_crop(china, 256)
  assert out.min() < 0 or out.max() > 255


@pytest.mark.parametrize('index', FIXTURES)
def test_eval_image_equals_the_tensorflow_pipeline(index):
  resolution, margin = tf_fixtures.setting('eval_resolution'), tf_fixtures.setting('eval_margin')
  ours = nfnets.data.eval_image(tf_fixtures.jpeg(index), resolution, margin)
  assert ours.shape == (resolution, resolution, 3) and ours.dtype == np.float32
  pixels = ours * ops_image.STDDEV_RGB + ops_image.MEAN_RGB  # back on the 0-255 scale
  difference = np.abs(pixels - tf_fixtures.get('eval', index))
  # Required: within 1 grey level (max) and 0.05 (mean); measured: float32 rounding only.
  assert difference.max() < 1e-3 and difference.mean() < 1e-4
  np.testing.assert_array_equal(
      ours, ops_image.normalize(ops_image.eval_resize_and_crop(
          tf_fixtures.get('decoded', index), resolution, margin)))


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
  expected = (pixels.astype(np.float32) - ops_image.MEAN_RGB) * ops_image.INV_STDDEV_RGB
  out = ops_image.normalize(pixels)
  assert out.dtype == np.float32 and out.shape == shape
  np.testing.assert_array_equal(out, expected)
  if len(shape) >= 3:  # Non-contiguous and float inputs take the same path.
    view = pixels[:, ::-1]
    np.testing.assert_array_equal(ops_image.normalize(view), expected[:, ::-1])
    np.testing.assert_array_equal(ops_image.normalize(pixels.astype(np.float64)), expected)
