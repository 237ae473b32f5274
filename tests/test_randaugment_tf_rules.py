"""RandAugment's Rotate, Shear, Translate, Color and Sharpness against the reference's TensorFlow rules.

The oracles below state each rule plainly in numpy (TensorFlow is not a dependency) and share no code
with nfnets.data; they follow the reference's TF ops as the spec describes them:

- projective transform (Rotate, ShearX/Y, TranslateX/Y): output pixel at column x, row y reads the
  input at ((a x + b y) + c, (d x + e y) + f), float32 one operation at a time, each coordinate
  rounded half away from zero; outside the image the fill colour 128;
- Color: blend towards tf.image.rgb_to_grayscale (uint8 * float32(1/255), weights 0.2989, 0.5870,
  0.1140 summed left to right in float32, * 255.5, truncated);
- Sharpness: blend towards the 3x3 [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 smoothing of the interior,
  truncated (floor of the integer sum / 13), border pixels kept;
- blend(degenerate, image, factor) = degenerate + factor * (image - degenerate) in float32, clipped to
  [0, 255] when extrapolating, truncated to uint8.
"""
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from nfnets.data import randaugment as ra

F32 = np.float32
FILL = 128
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')


# ---- The TF rules, plainly. ----

def round_half_away_from_zero(values: np.ndarray) -> np.ndarray:
  exact = values.astype(np.float64)  # float32 values are exact in float64, and so is |v| + 0.5
  return np.sign(exact) * np.floor(np.abs(exact) + 0.5)


def tf_affine(image: np.ndarray, transform) -> np.ndarray:
  a, b, c, d, e, f = (F32(v) for v in transform)
  height, width = image.shape[:2]
  y, x = np.meshgrid(np.arange(height, dtype=F32), np.arange(width, dtype=F32), indexing='ij')
  source_x = round_half_away_from_zero(((a * x) + (b * y)) + c)
  source_y = round_half_away_from_zero(((d * x) + (e * y)) + f)
  inside = (source_x >= 0) & (source_x <= width - 1) & (source_y >= 0) & (source_y <= height - 1)
  out = np.full_like(image, FILL)
  out[inside] = image[source_y[inside].astype(int), source_x[inside].astype(int)]
  return out


def tf_rotate_transform(degrees: float, height: int, width: int):
  # TF's rotation about the centre: angle in float32, cos/sin in float32, offsets in float32.
  angle = F32(degrees * (math.pi / 180.0))
  cos, sin = F32(math.cos(angle)), F32(math.sin(angle))
  w, h = F32(width) - F32(1), F32(height) - F32(1)
  x_offset = (w - (cos * w - sin * h)) / F32(2)
  y_offset = (h - (sin * w + cos * h)) / F32(2)
  return cos, -sin, x_offset, sin, cos, y_offset


def tf_geometric(image: np.ndarray, name: str, arg: float) -> np.ndarray:
  height, width = image.shape[:2]
  transform = {
      'Rotate': lambda: tf_rotate_transform(arg, height, width),
      'ShearX': lambda: (1, arg, 0, 0, 1, 0),
      'ShearY': lambda: (1, 0, 0, arg, 1, 0),
      'TranslateX': lambda: (1, 0, arg, 0, 1, 0),
      'TranslateY': lambda: (1, 0, 0, 0, 1, arg),
  }[name]()
  return tf_affine(image, transform)


def tf_rgb_to_grayscale(image: np.ndarray) -> np.ndarray:
  scaled = image.astype(F32) * F32(1.0 / 255)
  grey = scaled[..., 0] * F32(0.2989) + scaled[..., 1] * F32(0.5870) + scaled[..., 2] * F32(0.1140)
  return (grey * F32(255.5)).astype(np.uint8)


def tf_smooth(image: np.ndarray) -> np.ndarray:
  height, width = image.shape[:2]
  kernel = [[1, 1, 1], [1, 5, 1], [1, 1, 1]]
  total = sum(kernel[dy][dx] * image[dy:height - 2 + dy, dx:width - 2 + dx].astype(np.int64)
              for dy in range(3) for dx in range(3))
  out = image.copy()
  out[1:-1, 1:-1] = total // 13
  return out


def tf_blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
  if factor == 1.0:
    return image
  low, high = degenerate.astype(F32), image.astype(F32)
  mixed = low + F32(factor) * (high - low)
  if 0.0 < factor < 1.0:
    return mixed.astype(np.uint8)
  return np.clip(mixed, 0.0, 255.0).astype(np.uint8)


def tf_enhance(image: np.ndarray, name: str, factor: float) -> np.ndarray:
  if name == 'Color':
    degenerate = np.repeat(tf_rgb_to_grayscale(image)[..., None], 3, axis=-1)
  else:
    degenerate = tf_smooth(image)
  return tf_blend(degenerate, image, factor)


# ---- Fixtures and helpers. ----

@pytest.fixture(scope='module', params=[(160, 211), (224, 224)], ids=['160x211', '224x224'])
def photo(request) -> np.ndarray:
  height, width = request.param
  return np.asarray(Image.fromarray(load_sample_image('china.jpg')).resize((width, height)))


def _apply(image: np.ndarray, name: str, arg) -> np.ndarray:
  op = ra.REFERENCE_OP_FUNCTIONS[name]
  return np.asarray(op(Image.fromarray(image), arg, np.random.default_rng(0)))


def _signed_arg(name: str, magnitude: float, sign: int) -> float:
  return sign * abs(ra.LEVEL_TO_ARG[name](magnitude, np.random.default_rng(0)))


# ---- Geometric ops. ----

@pytest.mark.parametrize('sign', [1, -1])
@pytest.mark.parametrize('magnitude', [5, 10, 15, 7.3])
@pytest.mark.parametrize('name', GEOMETRIC)
def test_geometric_ops_follow_the_tf_transform_rule(photo, name, magnitude, sign):
  arg = _signed_arg(name, magnitude, sign)
  np.testing.assert_array_equal(_apply(photo, name, arg), tf_geometric(photo, name, arg))


def test_shear_on_a_photo_differs_from_pixel_centre_sampling(photo):
  # What the rule replaced: Pillow's affine transform (pixel centres) moves many pixels.
  level = _signed_arg('ShearX', 10, 1)
  pillow = np.asarray(Image.fromarray(photo).transform(
      photo.shape[1::-1], Image.AFFINE, (1, level, 0, 0, 1, 0), resample=Image.NEAREST,
      fillcolor=(FILL,) * 3))
  moved = (pillow != tf_geometric(photo, 'ShearX', level)).any(axis=-1).mean()
  assert moved > 0.05


def test_shear_rounds_exact_ties_half_away_from_zero():
  # Level +-0.5: odd rows read exactly between two columns. std::round takes the one away from zero,
  # so row 1 reads column x + 1 (the last pixel falls off the image), and with -0.5 column x (0 for
  # x = 1 since 0.5 rounds up, fill for x = 0 since -0.5 rounds to -1). Half-to-even would differ.
  height, width = 4, 6
  image = np.zeros((height, width, 3), np.uint8)
  image[..., 0] = np.arange(width) * 10 + 10
  image[..., 1] = np.arange(height)[:, None] * 50 + 1
  forward, backward = _apply(image, 'ShearX', 0.5), _apply(image, 'ShearX', -0.5)
  np.testing.assert_array_equal(forward[1, :-1], image[1, 1:])
  np.testing.assert_array_equal(forward[1, -1], [FILL] * 3)
  np.testing.assert_array_equal(backward[1, 1:], image[1, 1:])
  np.testing.assert_array_equal(backward[1, 0], [FILL] * 3)
  np.testing.assert_array_equal(forward[2, :-1], image[2, 1:])   # 1.0: a whole column
  np.testing.assert_array_equal(forward[0], image[0])
  for level in (0.5, -0.5, 0.25, -0.75):
    for name in ('ShearX', 'ShearY'):
      np.testing.assert_array_equal(_apply(image, name, level), tf_geometric(image, name, level))


def test_shear_rounds_float32_sums_not_exact_ones():
  # At M = 15 (level -0.45 in float32), x + level * y lands on k + 1/2 in float32 where the exact sum
  # does not: thousands of pixels of a 224^2 image, all rounded from the float32 value.
  level = F32(-0.45)
  y, x = np.mgrid[0:224, 0:224]
  float32_sum = x.astype(F32) + level * y.astype(F32)
  exact_sum = x + np.float64(level) * y
  ties = float32_sum - np.floor(float32_sum) == 0.5
  assert (ties & (exact_sum - np.floor(exact_sum) != 0.5)).sum() > 100
  image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8)
  out = _apply(image, 'ShearX', float(level))
  np.testing.assert_array_equal(out, tf_geometric(image, 'ShearX', float(level)))


@pytest.mark.parametrize('name', GEOMETRIC)
def test_fill_is_grey_128_outside_and_black_pixels_are_kept(name):
  # TF marks pixels from outside the image by a zero in an extra channel, not by their colour:
  # black input pixels stay black, everything outside becomes (128, 128, 128).
  image = np.zeros((50, 70, 3), np.uint8)
  arg = -20.0 if name.startswith('Translate') else _signed_arg(name, 10, -1)
  out = _apply(image, name, arg)
  expected = tf_geometric(image, name, arg)
  np.testing.assert_array_equal(out, expected)
  filled = (out == FILL).all(axis=-1)
  assert filled.any() and (out[~filled] == 0).all()
  assert ((out == FILL) | (out == 0)).all()


def test_rotate_matches_pillow_up_to_ties(photo):
  # Same rotation (about the centre, counter-clockwise for a positive angle) as Pillow's, which
  # samples pixel centres in float64: only points within float32 rounding of a pixel boundary differ.
  for degrees in (15.0, -30.0, 45.0):
    pillow = np.asarray(Image.fromarray(photo).rotate(degrees, resample=Image.NEAREST,
                                                      fillcolor=(FILL,) * 3))
    out = _apply(photo, 'Rotate', degrees)
    assert (out != pillow).any(axis=-1).mean() < 0.002


# ---- Color and Sharpness. ----

@pytest.mark.parametrize('magnitude', [0, 5, 10, 15])
@pytest.mark.parametrize('name', ['Color', 'Sharpness'])
def test_color_and_sharpness_follow_the_tf_rule(photo, name, magnitude):
  factor = ra.LEVEL_TO_ARG[name](magnitude, np.random.default_rng(0))
  out = _apply(photo, name, factor)
  np.testing.assert_array_equal(out, tf_enhance(photo, name, factor))
  if magnitude == 5:
    np.testing.assert_array_equal(out, photo)


def test_the_tf_degenerate_images_differ_from_pillows(photo):
  # Why the rules matter: Pillow's grey rounds and its SMOOTH filter rounds; TF truncates.
  pillow_grey = np.asarray(Image.fromarray(photo).convert('L'))
  assert (tf_rgb_to_grayscale(photo) != pillow_grey).mean() > 0.1
  np.testing.assert_array_equal(ra.tf_grey(photo), tf_rgb_to_grayscale(photo))
  np.testing.assert_array_equal(ra.tf_smooth(photo), tf_smooth(photo))
  colours = np.random.default_rng(1).integers(0, 256, (200_000, 3), np.uint8)
  np.testing.assert_array_equal(ra.tf_grey(colours), tf_rgb_to_grayscale(colours))


def test_sharpness_truncates_the_smoothed_value():
  # Centre 0 with seven neighbours at 1 (and one at 0): S = 7, 7/13 = 0.54 truncates to 0 where
  # Pillow's SMOOTH rounds to 1. With factor 0.1 (M = 0) the centre stays 0.
  image = np.zeros((3, 3, 3), np.uint8)
  image[0, :] = image[2, :] = 1
  image[1, 0] = 1
  assert ra.tf_smooth(image)[1, 1].tolist() == [0, 0, 0]
  big = np.kron(np.random.default_rng(2).integers(0, 256, (9, 9, 3), np.uint8), np.ones((3, 3, 1), np.uint8))
  for magnitude in (0, 15):
    factor = ra.LEVEL_TO_ARG['Sharpness'](magnitude, None)
    np.testing.assert_array_equal(_apply(big, 'Sharpness', factor), tf_enhance(big, 'Sharpness', factor))


@pytest.mark.parametrize('magnitude', [0, 10, 15])
def test_flat_channels_and_grey_images(photo, magnitude):
  # A flat channel smooths to itself (S = 13 v exactly: floor keeps v), so Sharpness leaves it as it
  # is; a grey image (R = G = B) is its own TF grey only up to truncation, which Color then amplifies.
  flat = photo.copy()
  flat[..., 1] = 77
  grey = np.repeat(photo[..., :1], 3, axis=-1)
  for image in (flat, grey):
    for name in ('Color', 'Sharpness'):
      factor = ra.LEVEL_TO_ARG[name](magnitude, None)
      np.testing.assert_array_equal(_apply(image, name, factor), tf_enhance(image, name, factor))
  factor = ra.LEVEL_TO_ARG['Sharpness'](magnitude, None)
  assert (_apply(flat, 'Sharpness', factor)[..., 1] == 77).all()


@pytest.mark.parametrize('shape', [(90, 17), (17, 90)], ids=['tall', 'wide'])
@pytest.mark.parametrize('name,arg', [('TranslateX', 12.5), ('TranslateY', -7.5), ('TranslateX', -0.25),
                                      ('ShearX', 0.45), ('ShearX', -0.45), ('ShearY', 0.3)])
def test_fractional_translations_and_shears_that_empty_whole_rows(shape, name, arg):
  # Whole-pixel translations are copies and ShearX is row copies; a fractional translation (half
  # pixels are ties: +12.5 reads x + 13) and a shear that moves whole rows out of a tall image take
  # the general gather. All follow the same rule.
  image = np.random.default_rng(3).integers(0, 256, shape + (3,), np.uint8)
  np.testing.assert_array_equal(_apply(image, name, arg), tf_geometric(image, name, arg))
