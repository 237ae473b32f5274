"""Classification losses and accuracy counts shared by training and evaluation.

Targets arrive already mixed (MixUp/CutMix produce convex combinations of one-hot rows); label smoothing is
applied here, after mixing, as in the NFNet recipe: t <- (1 - s) * t + s / num_classes.
"""
from typing import Optional

import jax
import jax.numpy as jnp


def smooth_labels(targets: jax.Array, label_smoothing: float) -> jax.Array:
  """(1 - s) * targets + s / num_classes over the last axis, in float32."""
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
  targets = targets.astype(jnp.float32)
  return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


def per_example_softmax_cross_entropy(logits: jax.Array, targets: jax.Array,
                                      label_smoothing: float = 0.0) -> jax.Array:
  """-sum_c t_c log softmax(logits)_c per example, float32, shape logits.shape[:-1].

  Args:
    logits: [..., num_classes], any float dtype (the softmax is taken in float32).
    targets: [..., num_classes] (mixed) one-hot rows, or integer class ids of shape [...].
    label_smoothing: s in [0, 1), applied to the targets after mixing.
  """
  num_classes = logits.shape[-1]
  if jnp.issubdtype(targets.dtype, jnp.integer) and targets.shape == logits.shape[:-1]:
    targets = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
  if targets.shape != logits.shape:
    raise ValueError(f'targets {targets.shape} must match logits {logits.shape} (one-hot rows), '
                     f'or be integer labels of shape {logits.shape[:-1]}')
  targets = smooth_labels(targets, label_smoothing)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets * log_probs, axis=-1)


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0,
                          weights: Optional[jax.Array] = None) -> jax.Array:
  """Mean softmax cross-entropy over the batch (float32 scalar).

  With `weights` (per example, e.g. a 0/1 padding mask) the mean is sum(w * loss) / sum(w), and 0 when all
  weights are 0. See `per_example_softmax_cross_entropy` for the arguments.
  """
  losses = per_example_softmax_cross_entropy(logits, targets, label_smoothing)
  if weights is None:
    return jnp.mean(losses)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != losses.shape:
    raise ValueError(f'weights {weights.shape} must have one entry per example {losses.shape}')
  total = jnp.sum(weights)
  return jnp.where(total > 0, jnp.sum(weights * losses) / jnp.where(total > 0, total, 1.0), 0.0)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the integer label is among the k highest logits, else 0.0; float32, shape labels.shape.

  Ties are broken towards the lower class index (jax.lax.top_k's order).
  """
  num_classes = logits.shape[-1]
  if not 1 <= k <= num_classes:
    raise ValueError(f'k must be in [1, {num_classes}], got {k}')
  if labels.shape != logits.shape[:-1] or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels {labels.shape} must be integer class ids of shape {logits.shape[:-1]}')
  _, top_indices = jax.lax.top_k(logits, k)
  return jnp.any(top_indices == labels[..., None], axis=-1).astype(jnp.float32)
