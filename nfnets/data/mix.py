"""MixUp and CutMix as the reference mixes: disjoint pairs of float crops, one example per pair.

The reference decodes 2B crops for a device's B examples: the first B/2 examples are MixUp and the
other B/2 CutMix, each made from two crops that no other example uses. Here a pair is two consecutive
crops of the (shuffled) stream, which is the same distribution; `uses_cutmix` tells which kind an
example is from its position in its device's batch (with an odd B, CutMix gets the extra example).

In both, the first crop `a` gets target weight `ratio` and the second `b` weight 1 - ratio:

- MixUp: ratio ~ Beta(alpha, alpha) per example; image = ratio * a + (1 - ratio) * b in float32.
- CutMix: a box with sides int(sqrt(1 - u) * H) and int(sqrt(1 - u) * W), u ~ Uniform(0, 1), centred
  at a uniform integer pixel, halves rounded down, clipped to the image; the image is `a` inside the
  box and `b` outside, and ratio = the box's area / (H * W) after clipping (the area `a` keeps).

Images are mixed as floats (the unclipped bicubic crops); the caller clips and truncates afterwards.
"""
from typing import Sequence, Tuple

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


def uses_cutmix(position: int, per_device: int) -> bool:
  """Whether the example at `position` of a device's batch of `per_device` is CutMix (else MixUp)."""
  if not 0 <= position < per_device:
    raise ValueError(f'Position {position} is outside a device batch of {per_device}.')
  return position >= per_device // 2


def cutmix_box(height: int, width: int, rng: np.random.Generator) -> Tuple[int, int, int, int]:
  """(top, bottom, left, right) of a CutMix box: side ratio sqrt(1 - U), uniform centre, clipped."""
  side_ratio = np.sqrt(1.0 - rng.random())
  cut_h, cut_w = int(side_ratio * height), int(side_ratio * width)
  center_y, center_x = int(rng.integers(0, height)), int(rng.integers(0, width))
  top, bottom = np.clip([center_y - cut_h // 2, center_y + cut_h // 2], 0, height)
  left, right = np.clip([center_x - cut_w // 2, center_x + cut_w // 2], 0, width)
  return int(top), int(bottom), int(left), int(right)


def mixup(image_a: np.ndarray, image_b: np.ndarray, ratio: float) -> np.ndarray:
  """ratio * a + (1 - ratio) * b, in float32."""
  ratio = np.float32(ratio)
  mixed = np.multiply(image_a, ratio, dtype=np.float32)
  mixed += np.multiply(image_b, np.float32(1) - ratio, dtype=np.float32)
  return mixed


def cutmix(image_a: np.ndarray, image_b: np.ndarray,
           box: Tuple[int, int, int, int]) -> Tuple[np.ndarray, float]:
  """(`a` inside `box`, `b` outside, as float32; the fraction of the image inside the box)."""
  top, bottom, left, right = box
  mixed = np.array(image_b, dtype=np.float32)
  mixed[top:bottom, left:right] = image_a[top:bottom, left:right]
  height, width = mixed.shape[:2]
  return mixed, (bottom - top) * (right - left) / (height * width)


def mix_pair(images: Sequence[np.ndarray], targets: Sequence[np.ndarray], use_cutmix: bool,
             rng: np.random.Generator, alpha: float = 0.2) -> Tuple[np.ndarray, np.ndarray]:
  """One example from two crops `images` = (a, b) [H, W, C] and their float `targets` = (y_a, y_b).

  Returns (float32 [H, W, C] image, float32 target ratio * y_a + (1 - ratio) * y_b).
  """
  image_a, image_b = images
  if image_a.shape != image_b.shape or image_a.ndim != 3:
    raise ValueError(f'Expected two [H, W, C] images of one shape, got {image_a.shape} and '
                     f'{image_b.shape}.')
  if alpha <= 0:
    raise ValueError(f'MixUp alpha must be positive, got {alpha}.')
  if use_cutmix:
    mixed, ratio = cutmix(image_a, image_b, cutmix_box(*image_a.shape[:2], rng))
  else:
    ratio = float(np.float32(rng.beta(alpha, alpha)))
    mixed = mixup(image_a, image_b, ratio)
  ratio = np.float32(ratio)
  first, second = (np.asarray(t, np.float32) for t in targets)
  return mixed, (ratio * first + (1 - ratio) * second).astype(np.float32)
