"""MixUp on the first half of a batch, CutMix on the second half (host-side numpy).

Partner rule: within each half, example i is mixed with example (i + 1) mod n of the same half (a
roll by one), so with two or more examples in a half nobody is paired with itself. A half holding a
single example is paired with itself, which leaves it unchanged with its own one-hot target; so batch
size 1 passes through untouched. For an odd batch the CutMix half gets the extra example
(MixUp takes B // 2).

MixUp: ratio r ~ Beta(alpha, alpha) per example; image = r x_i + (1 - r) x_partner and
target = r y_i + (1 - r) y_partner.

CutMix (as the reference): per example u ~ Uniform(0, 1); a box with sides int(sqrt(1 - u) * H) and
int(sqrt(1 - u) * W) centred at a uniform integer pixel, halves rounded down and clipped to the
image; the partner's pixels are pasted into the box, and the partner's target weight is the area
actually pasted (after clipping) divided by H * W. The reference keeps its own pixels inside the box
instead; with the roles of the pair swapped that is the same distribution of (images, targets).
"""
from typing import Tuple

import numpy as np


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 [B, num_classes] one-hot targets from int labels [B]; rejects labels out of range."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'Expected integer labels of shape [B], got {labels.dtype} {labels.shape}.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'Labels must lie in [0, {num_classes}), got range '
                     f'[{labels.min()}, {labels.max()}].')
  targets = np.zeros((labels.shape[0], num_classes), np.float32)
  targets[np.arange(labels.shape[0]), labels] = 1.0
  return targets


def _targets(labels: np.ndarray, num_classes: int, batch: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim == 2:
    if labels.shape != (batch, num_classes):
      raise ValueError(f'One-hot labels must be [{batch}, {num_classes}], got {labels.shape}.')
    return labels.astype(np.float32)
  if labels.shape != (batch,):
    raise ValueError(f'Labels must be [{batch}] ints or [{batch}, {num_classes}] one-hot, '
                     f'got {labels.shape}.')
  return one_hot(labels, num_classes)


def _partners(start: int, stop: int) -> np.ndarray:
  return start + (np.arange(stop - start) + 1) % max(stop - start, 1)


def cutmix_box(height: int, width: int, rng: np.random.Generator) -> Tuple[int, int, int, int]:
  """(top, bottom, left, right) of a CutMix box: side ratio sqrt(1 - U), uniform centre, clipped."""
  side_ratio = np.sqrt(1.0 - rng.random())
  cut_h, cut_w = int(side_ratio * height), int(side_ratio * width)
  center_y, center_x = int(rng.integers(0, height)), int(rng.integers(0, width))
  top, bottom = np.clip([center_y - cut_h // 2, center_y + cut_h // 2], 0, height)
  left, right = np.clip([center_x - cut_w // 2, center_x + cut_w // 2], 0, width)
  return int(top), int(bottom), int(left), int(right)


def mixup_cutmix(images: np.ndarray, labels: np.ndarray, num_classes: int,
                 rng: np.random.Generator, alpha: float = 0.2) -> Tuple[np.ndarray, np.ndarray]:
  """MixUp on images[:B // 2], CutMix on images[B // 2:]; see the module docstring for the rules.

  Args:
    images: uint8 [B, H, W, 3].
    labels: int [B] class ids, or float [B, num_classes] targets (e.g. already mixed or smoothed).
    num_classes: number of classes of the targets.
    rng: numpy Generator for the ratios, boxes.
    alpha: Beta(alpha, alpha) concentration of the MixUp ratios.

  Returns:
    (uint8 [B, H, W, 3] mixed images, rounded; float32 [B, num_classes] mixed targets).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f'Expected uint8 images [B, H, W, C], got {images.dtype} {images.shape}.')
  if alpha <= 0:
    raise ValueError(f'MixUp alpha must be positive, got {alpha}.')
  batch, height, width = images.shape[:3]
  targets = _targets(labels, num_classes, batch)
  num_mixup = batch // 2

  mixed_images = images.copy()
  mixed_targets = targets.copy()

  partners = _partners(0, num_mixup)
  ratios = rng.beta(alpha, alpha, size=num_mixup).astype(np.float32)
  if num_mixup:
    # float32 as numpy promotes r * uint8, computed one example at a time in two reused scratch
    # buffers: mixed uint8 x float32 ufuncs go through numpy's slow buffered casting, and
    # batch-sized temporaries cost fresh pages on every call.
    blended = np.empty(images.shape[1:], np.float32)
    partner_image = np.empty_like(blended)
    for i, (partner, ratio) in enumerate(zip(partners, ratios)):
      blended[...] = images[i]
      blended *= ratio
      partner_image[...] = images[partner]
      partner_image *= 1 - ratio
      blended += partner_image
      np.rint(blended, out=blended)
      np.clip(blended, 0, 255, out=blended)
      mixed_images[i] = blended
    mixed_targets[:num_mixup] = (ratios[:, None] * targets[:num_mixup]
                                 + (1 - ratios[:, None]) * targets[partners])

  for i, partner in zip(range(num_mixup, batch), _partners(num_mixup, batch)):
    top, bottom, left, right = cutmix_box(height, width, rng)
    mixed_images[i, top:bottom, left:right] = images[partner, top:bottom, left:right]
    pasted = (bottom - top) * (right - left) / (height * width)
    mixed_targets[i] = (1 - pasted) * targets[i] + pasted * targets[partner]
  return mixed_images, mixed_targets
