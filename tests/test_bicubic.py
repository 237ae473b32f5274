"""nfnets.data.bicubic against TensorFlow's outputs (stored fixtures), and its own identities."""
import jax
import numpy as np
import pytest
from sklearn.datasets import load_sample_image

from nfnets.data import bicubic
from tests import tf_fixtures


@pytest.fixture(scope='module')
def china() -> np.ndarray:
  return load_sample_image('china.jpg')


@pytest.mark.parametrize('index', range(tf_fixtures.num_images()))
def test_resize_equals_tensorflow_bit_for_bit(index):
  decoded = tf_fixtures.get('decoded', index)
  resolution = tf_fixtures.setting('eval_resolution')
  full = resolution + tf_fixtures.setting('eval_margin')
  offset = (full - resolution + 1) // 2
  ours = bicubic.resize(decoded, full, full)[offset:offset + resolution, offset:offset + resolution]
  np.testing.assert_array_equal(ours, tf_fixtures.get('eval', index))


def test_exact_keys_cubic_is_not_tensorflow(china):
  # TF looks its weights up in a 1/1024-pixel table; evaluating the cubic exactly (jax) is close
  # but not equal, which is why the table is reproduced.
  ours = bicubic.resize(china, 288, 288)
  exact = np.asarray(jax.image.resize(china.astype(np.float32), (288, 288, 3), 'bicubic',
                                      antialias=False))
  difference = np.abs(ours - exact)
  assert 0.01 < difference.max() < 0.5 and difference.mean() < 0.02


@pytest.mark.parametrize('shape', [(64, 48), (500, 700), (1, 3), (427, 640)])
def test_mirror_equals_resizing_the_flipped_image_exactly(china, shape):
  crop = china[13:213, 7:180]
  flipped = np.ascontiguousarray(crop[:, ::-1])
  np.testing.assert_array_equal(bicubic.resize(crop, *shape, mirror=True),
                                bicubic.resize(flipped, *shape))


def test_row_and_column_windows_equal_slicing_the_whole_resize(china):
  whole = bicubic.resize(china, 300, 280)
  window = bicubic.resize(china, 300, 280, rows=(17, 290), cols=(3, 100))
  np.testing.assert_array_equal(window, whole[17:290, 3:100])


@pytest.mark.parametrize('channels', [1, 3, 4])
def test_any_channel_count_and_dtype_gives_float32_unclipped(china, channels):
  image = np.dstack([china] * 2)[..., :channels]
  out = bicubic.resize(image, 100, 150)
  assert out.shape == (100, 150, channels) and out.dtype == np.float32
  np.testing.assert_array_equal(out, bicubic.resize(image.astype(np.float64), 100, 150))
  # Keys' cubic overshoots at edges: values outside [0, 255] are kept.
  assert out.min() < 0 or out.max() > 255


def test_weights_sum_to_one_and_edges_renormalise():
  indices, weights = bicubic.taps(10, 4)
  assert weights.shape == (4, 4) and indices.min() >= 0 and indices.max() <= 9
  np.testing.assert_allclose(weights.sum(axis=1), 1, atol=1e-6)
  # Upscaling 1 pixel: the only tap inside the image carries everything.
  _, single = bicubic.taps(1, 5)
  np.testing.assert_array_equal(single.sum(axis=1), np.ones(5, np.float32))


def test_bad_arguments_are_rejected(china):
  with pytest.raises(ValueError, match='positive'):
    bicubic.taps(0, 3)
  with pytest.raises(ValueError, match='HWC'):
    bicubic.resize(china[..., 0], 10, 10)
  with pytest.raises(ValueError, match='start < stop'):
    bicubic.resize(china, 10, 10, rows=(5, 5))
