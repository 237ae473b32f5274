"""Tests for nfnets.data.mix: MixUp/CutMix ratios, partners, label weights, edge batch sizes."""
import numpy as np
import pytest

from nfnets.data import mix


def _constant_batch(batch, height=24, width=20):
  # Example i is filled with a distinct grey level so every output pixel names its source.
  levels = (np.arange(batch) * 29 + 10).astype(np.uint8)
  images = np.broadcast_to(levels[:, None, None, None], (batch, height, width, 3)).copy()
  return images, levels


def test_shapes_dtypes_and_target_sums():
  images, _ = _constant_batch(8)
  out_images, targets = mix.mixup_cutmix(images, np.arange(8), 10, np.random.default_rng(0))
  assert out_images.shape == images.shape and out_images.dtype == np.uint8
  assert targets.shape == (8, 10) and targets.dtype == np.float32
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
  assert (targets >= 0).all()


@pytest.mark.parametrize('seed', range(5))
def test_cutmix_label_weight_equals_pasted_pixel_fraction(seed):
  batch = 8
  images, levels = _constant_batch(batch)
  out, targets = mix.mixup_cutmix(images, np.arange(batch), batch, np.random.default_rng(seed))
  for i in range(batch // 2, batch):
    partner = batch // 2 + (i - batch // 2 + 1) % (batch - batch // 2)
    pixels = out[i, ..., 0]
    assert set(np.unique(pixels)) <= {levels[i], levels[partner]}
    pasted = np.mean(pixels == levels[partner])
    assert targets[i, partner] == pytest.approx(pasted, abs=1e-6)
    assert targets[i, i] == pytest.approx(1 - pasted, abs=1e-6)
    # The pasted region is one axis-aligned box.
    rows, cols = np.nonzero(pixels == levels[partner])
    if rows.size:
      assert rows.size == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_mixup_pixels_and_targets_use_the_same_ratio():
  batch = 8
  images, levels = _constant_batch(batch)
  out, targets = mix.mixup_cutmix(images, np.arange(batch), batch, np.random.default_rng(1))
  for i in range(batch // 2):
    partner = (i + 1) % (batch // 2)
    ratio = targets[i, i]
    assert targets[i, partner] == pytest.approx(1 - ratio, abs=1e-6)
    expected = ratio * float(levels[i]) + (1 - ratio) * float(levels[partner])
    assert np.all(np.abs(out[i].astype(np.float32) - expected) <= 0.5 + 1e-4)


def test_mixup_ratios_follow_a_u_shaped_beta():
  batch = 2000
  images = np.zeros((batch, 1, 1, 3), np.uint8)
  _, targets = mix.mixup_cutmix(images, np.arange(batch) % 7, 7, np.random.default_rng(0),
                                alpha=0.2)
  ratios = np.array([targets[i, i % 7] for i in range(batch // 2) if i % 7 != (i + 1) % 7])
  # Beta(0.2, 0.2) puts about 0.3 of its mass in (0.1, 0.9); Beta(1, 1) would put 0.8 there.
  middle = np.mean((ratios > 0.1) & (ratios < 0.9))
  assert 0.2 < middle < 0.42
  assert np.mean(ratios) == pytest.approx(0.5, abs=0.05)


def test_batch_of_one_passes_through_and_odd_batches_work():
  images, _ = _constant_batch(1)
  out, targets = mix.mixup_cutmix(images, np.array([3]), 5, np.random.default_rng(0))
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(targets, [[0, 0, 0, 1, 0]])
  images, _ = _constant_batch(5)
  out, targets = mix.mixup_cutmix(images, np.arange(5), 5, np.random.default_rng(0))
  assert out.shape == images.shape
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
  # Two MixUp examples, three CutMix examples: nobody mixes with itself.
  assert (np.diag(targets) < 1).sum() >= 3


def test_one_hot_or_soft_labels_are_accepted():
  images, _ = _constant_batch(4)
  soft = np.full((4, 3), 1 / 3, np.float32)
  _, targets = mix.mixup_cutmix(images, soft, 3, np.random.default_rng(0))
  np.testing.assert_allclose(targets, soft, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
  images, _ = _constant_batch(4)
  with pytest.raises(ValueError, match='Labels must lie'):
    mix.mixup_cutmix(images, np.array([0, 1, 2, 9]), 5, np.random.default_rng(0))
  with pytest.raises(ValueError, match='One-hot labels'):
    mix.mixup_cutmix(images, np.zeros((4, 7)), 5, np.random.default_rng(0))
  with pytest.raises(ValueError, match='uint8 images'):
    mix.mixup_cutmix(images.astype(np.float32), np.arange(4), 5, np.random.default_rng(0))
  with pytest.raises(ValueError, match='alpha'):
    mix.mixup_cutmix(images, np.arange(4), 5, np.random.default_rng(0), alpha=0)


@pytest.mark.parametrize('batch', [2, 5, 32])
def test_mixup_matches_the_plain_float32_batch_formula_exactly(batch):
  # The per-example in-place loop must reproduce r * x + (1 - r) * x_partner (float32), rounded.
  images = np.random.default_rng(batch).integers(0, 256, (batch, 13, 11, 3), dtype=np.uint8)
  out, _ = mix.mixup_cutmix(images, np.arange(batch), batch, np.random.default_rng(3))
  half = batch // 2
  ratios = np.random.default_rng(3).beta(0.2, 0.2, size=half).astype(np.float32)
  r = ratios[:, None, None, None]
  partners = (np.arange(half) + 1) % half
  expected = np.clip(np.rint(r * images[:half] + (1 - r) * images[partners]), 0, 255)
  np.testing.assert_array_equal(out[:half], expected.astype(np.uint8))
