"""Cross-entropy with label smoothing after mixing, and top-k counts, against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import losses


def numpy_cross_entropy(logits, targets, smoothing):
  logits = np.asarray(logits, np.float64)
  targets = np.asarray(targets, np.float64)
  targets = targets * (1 - smoothing) + smoothing / logits.shape[-1]
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
  return -np.sum(targets * log_probs, axis=-1)


def mixed_targets(rng, batch, num_classes):
  """Convex pairs of one-hot rows, as MixUp/CutMix produce."""
  ratio = rng.uniform(size=(batch, 1))
  first = np.eye(num_classes)[rng.integers(num_classes, size=batch)]
  second = np.eye(num_classes)[rng.integers(num_classes, size=batch)]
  return (ratio * first + (1 - ratio) * second).astype(np.float32)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cross_entropy_on_mixed_targets_matches_numpy(smoothing):
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(16, 10)) * 5).astype(np.float32)
  targets = mixed_targets(rng, 16, 10)
  expected = numpy_cross_entropy(logits, targets, smoothing)
  loss = jax.jit(losses.softmax_cross_entropy, static_argnums=2)(logits, targets, smoothing)
  assert loss.dtype == jnp.float32
  assert float(loss) == pytest.approx(expected.mean(), rel=1e-5)
  np.testing.assert_allclose(losses.per_example_softmax_cross_entropy(logits, targets, smoothing), expected,
                             rtol=1e-5)


def test_smoothing_is_applied_once_to_the_mixed_row():
  # Smoothing is affine and mixing convex, so they commute; what matters is that the loss smooths the mixed
  # row it receives exactly once. Pin the smoothed target it must see.
  targets = np.array([[0.7, 0.3, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(losses.smooth_labels(targets, 0.2), [[0.61, 0.29, 0.05, 0.05]], rtol=1e-6)
  logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
  assert float(losses.softmax_cross_entropy(logits, targets, 0.2)) == pytest.approx(
      numpy_cross_entropy(logits, [[0.61, 0.29, 0.05, 0.05]], 0.0)[0], rel=1e-6)


def test_weighted_mean_masks_padding_and_bf16_logits_compute_in_float32():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, 5)).astype(np.float32)
  labels = rng.integers(5, size=8)
  mask = np.array([1, 1, 1, 0, 1, 0, 0, 1], np.float32)
  per_example = numpy_cross_entropy(logits, np.eye(5)[labels], 0.1)
  loss = losses.softmax_cross_entropy(logits, jnp.asarray(labels, jnp.int32), 0.1, weights=mask)
  assert float(loss) == pytest.approx(np.sum(per_example * mask) / mask.sum(), rel=1e-5)
  assert float(losses.softmax_cross_entropy(logits, np.eye(5)[labels], weights=np.zeros(8))) == 0.0
  bf16 = losses.softmax_cross_entropy(jnp.asarray(logits, jnp.bfloat16), np.eye(5)[labels])
  assert bf16.dtype == jnp.float32


def test_bad_shapes_and_smoothing_raise():
  logits = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match='targets'):
    losses.softmax_cross_entropy(logits, np.zeros((4, 5), np.float32))
  with pytest.raises(ValueError, match='weights'):
    losses.softmax_cross_entropy(logits, np.zeros((4, 3), np.float32), weights=np.ones(3))
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.softmax_cross_entropy(logits, np.zeros((4, 3), np.float32), label_smoothing=1.0)


@pytest.mark.parametrize('k', [1, 3])
def test_topk_correct_matches_numpy(k):
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 32, 10)).astype(np.float32)  # [devices, per_device, classes] also works
  labels = rng.integers(10, size=(2, 32)).astype(np.int32)
  ranks = np.argsort(-logits, axis=-1)[..., :k]
  expected = np.any(ranks == labels[..., None], axis=-1).astype(np.float32)
  result = losses.topk_correct(logits, labels, k)
  assert result.dtype == jnp.float32 and result.shape == (2, 32)
  np.testing.assert_array_equal(result, expected)
  assert 0 < expected.sum() < expected.size


def test_topk_rejects_bad_k_and_one_hot_labels():
  logits = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match='k must be'):
    losses.topk_correct(logits, np.zeros(4, np.int32), 4)
  with pytest.raises(ValueError, match='labels'):
    losses.topk_correct(logits, np.zeros((4, 3), np.float32), 1)
