"""Tests for nfnets.data.mix: pairs of float crops, MixUp/CutMix ratios and label weights."""
import numpy as np
import pytest

from nfnets.data import mix


def _flat(level, height=24, width=20, channels=3):
  return np.full((height, width, channels), level, np.float32)


def _targets(num_classes=5, first=1, second=3):
  return mix.one_hot(np.array([first, second]), num_classes)


def test_half_of_each_device_batch_is_mixup_the_other_half_cutmix():
  assert [mix.uses_cutmix(p, 4) for p in range(4)] == [False, False, True, True]
  # An odd batch gives CutMix the extra example; a batch of one is CutMix.
  assert [mix.uses_cutmix(p, 5) for p in range(5)] == [False, False, True, True, True]
  assert mix.uses_cutmix(0, 1)
  with pytest.raises(ValueError, match='outside a device batch'):
    mix.uses_cutmix(4, 4)


@pytest.mark.parametrize('seed', range(4))
def test_mixup_blends_floats_and_targets_with_one_ratio(seed):
  # Values outside [0, 255] (bicubic overshoot) are mixed as they are, not clipped.
  a, b = _flat(-12.5), _flat(300.25)
  image, target = mix.mix_pair((a, b), _targets(), False, np.random.default_rng(seed))
  ratio = np.float32(np.random.default_rng(seed).beta(0.2, 0.2))
  assert image.dtype == np.float32 and target.dtype == np.float32
  np.testing.assert_array_equal(image, ratio * a + (np.float32(1) - ratio) * b)
  np.testing.assert_allclose(target, [0, ratio, 0, 1 - ratio, 0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('seed', range(6))
def test_cutmix_keeps_the_first_crop_inside_the_box_and_weights_it_by_area(seed):
  a, b = _flat(10.5), _flat(200.0)
  image, target = mix.mix_pair((a, b), _targets(), True, np.random.default_rng(seed))
  inside = image[..., 0] == 10.5
  assert set(np.unique(image)) <= {10.5, 200.0}
  assert target[1] == pytest.approx(inside.mean(), abs=1e-6)
  assert target[3] == pytest.approx(1 - inside.mean(), abs=1e-6)
  # The first crop's pixels form one axis-aligned box: the one cutmix_box draws.
  top, bottom, left, right = mix.cutmix_box(24, 20, np.random.default_rng(seed))
  expected = np.zeros((24, 20), bool)
  expected[top:bottom, left:right] = True
  np.testing.assert_array_equal(inside, expected)


def test_cutmix_boxes_are_clipped_and_uniform_in_area():
  rng = np.random.default_rng(0)
  areas = []
  for _ in range(3000):
    top, bottom, left, right = mix.cutmix_box(32, 40, rng)
    assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 40
    areas.append((bottom - top) * (right - left) / (32 * 40))
  # The unclipped box covers 1 - u of the image, u uniform; clipping only removes area.
  assert 0.2 < np.mean(areas) < 0.5 and max(areas) > 0.8


def test_mixup_ratios_follow_a_u_shaped_beta():
  rng = np.random.default_rng(0)
  ratios = np.array([mix.mix_pair((_flat(0, 1, 1), _flat(0, 1, 1)), _targets(), False, rng)[1][1]
                     for _ in range(1500)])
  # Beta(0.2, 0.2) puts about 0.3 of its mass in (0.1, 0.9); Beta(1, 1) would put 0.8 there.
  assert 0.2 < np.mean((ratios > 0.1) & (ratios < 0.9)) < 0.42
  assert np.mean(ratios) == pytest.approx(0.5, abs=0.05)


def test_soft_targets_are_mixed_too():
  soft = np.full((2, 3), 1 / 3, np.float32)
  _, target = mix.mix_pair((_flat(1), _flat(2)), soft, True, np.random.default_rng(0))
  np.testing.assert_allclose(target, soft[0], rtol=1e-6)


def test_any_channel_count_is_mixed():
  image, _ = mix.mix_pair((_flat(1, channels=4), _flat(2, channels=4)), _targets(), False,
                          np.random.default_rng(0))
  assert image.shape == (24, 20, 4)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match='Labels must lie'):
    mix.one_hot(np.array([0, 1, 2, 9]), 5)
  with pytest.raises(ValueError, match='integer labels'):
    mix.one_hot(np.zeros((4, 7)), 5)
  with pytest.raises(ValueError, match='one shape'):
    mix.mix_pair((_flat(1), _flat(1, height=5)), _targets(), False, np.random.default_rng(0))
  with pytest.raises(ValueError, match='alpha'):
    mix.mix_pair((_flat(1), _flat(1)), _targets(), False, np.random.default_rng(0), alpha=0)
