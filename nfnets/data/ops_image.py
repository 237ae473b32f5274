"""Host-side image transforms: decode, random-resized crop, flip, eval resize, normalise.

Everything here is numpy/Pillow and runs inside the input workers. Images are uint8 HWC RGB unless a
docstring says otherwise.

Training crops follow the reference (TensorFlow's `sample_distorted_bounding_box` with the whole image
as the only box, then a centre-crop fallback), but decode with Pillow: the crop box is sampled from the
JPEG header alone, the JPEG is decoded at the smallest DCT scale that still covers the crop at the output
resolution, and the crop and bicubic resize are one `Image.resize(box=...)` call.

Evaluation resizes must match TensorFlow's `tf.image.resize(method='bicubic', antialias=False)` exactly
(the published checkpoints were evaluated that way), which Pillow cannot do, so `eval_resize_and_crop`
applies TF's Keys-cubic weights as two separable matrix products.
"""
import functools
import io
import math
from typing import Optional, Tuple

import numpy as np
from PIL import Image

# ImageNet channel statistics on the 0-255 scale.
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255
_INV_STDDEV_RGB = 1 / STDDEV_RGB

# The reference's crop sampler also requires the crop to cover this fraction of the image (its
# `min_object_covered`), which tightens area_range's lower end from 0.08 to 0.1.
MIN_OBJECT_COVERED = 0.1
# Margin of the reference's centre-crop fallback: a square of side min(H, W) * size / (size + 32).
FALLBACK_CROP_MARGIN = 32

# (top, left, height, width) in pixels of the original image.
Box = Tuple[int, int, int, int]


def _open(image_bytes: bytes) -> Image.Image:
  if not isinstance(image_bytes, (bytes, bytearray, memoryview, np.bytes_)):
    raise TypeError(f'Expected encoded image bytes, got {type(image_bytes).__name__}.')
  try:
    return Image.open(io.BytesIO(bytes(image_bytes)))
  except Exception as e:  # Pillow raises several types for undecodable data.
    raise ValueError(f'Cannot decode image ({len(image_bytes)} bytes): {e}; '
                     'pass JPEG/PNG/other Pillow-readable bytes.') from e


def _to_rgb(image: Image.Image) -> Image.Image:
  return image if image.mode == 'RGB' else image.convert('RGB')


def decode_image(image_bytes: bytes) -> np.ndarray:
  """Decodes JPEG/PNG/... bytes into a uint8 [H, W, 3] RGB array (grayscale, CMYK, RGBA converted)."""
  return np.asarray(_to_rgb(_open(image_bytes)))


def sample_distorted_box(height: int, width: int, rng: np.random.Generator,
                         area_range: Tuple[float, float] = (0.08, 1.0),
                         aspect_range: Tuple[float, float] = (3 / 4, 4 / 3),
                         attempts: int = 10,
                         min_object_covered: float = MIN_OBJECT_COVERED) -> Optional[Box]:
  """Samples a crop box the way TensorFlow's `sample_distorted_bounding_box` does, or None.

  Each attempt draws an aspect ratio w/h uniformly from `aspect_range`, then an integer height
  uniformly between the heights giving the minimum and the maximum area (capped so the box fits),
  sets width = round(height * aspect), nudges the height by one if rounding left the area outside
  `area_range`, and accepts the box if it fits and covers `min_object_covered` of the image. The
  offset is uniform over the valid positions. Returns None when every attempt fails.
  """
  image_area = float(height * width)
  min_area = area_range[0] * image_area
  max_area = area_range[1] * image_area
  for _ in range(attempts):
    aspect = rng.uniform(aspect_range[0], aspect_range[1])
    crop_h = int(round(math.sqrt(min_area / aspect)))
    max_h = int(round(math.sqrt(max_area / aspect)))
    if round(max_h * aspect) > width:
      max_h = int((width + 0.5 - 1e-7) / aspect)
      if round(max_h * aspect) > width:
        max_h -= 1
    max_h = min(max_h, height)
    crop_h = min(crop_h, max_h)
    if crop_h < max_h:
      crop_h += int(rng.integers(0, max_h - crop_h + 1))
    crop_w = int(round(crop_h * aspect))
    if crop_w * crop_h < min_area:
      crop_h += 1
      crop_w = int(round(crop_h * aspect))
    if crop_w * crop_h > max_area:
      crop_h -= 1
      crop_w = int(round(crop_h * aspect))
    area = crop_w * crop_h
    if (area < min_area or area > max_area or not 0 < crop_w <= width
        or not 0 < crop_h <= height or area < min_object_covered * image_area):
      continue
    top = int(rng.integers(0, height - crop_h)) if crop_h < height else 0
    left = int(rng.integers(0, width - crop_w)) if crop_w < width else 0
    return top, left, crop_h, crop_w
  return None


def center_fallback_box(height: int, width: int, size: int) -> Box:
  """The reference's fallback crop: centred square of side int(min(H, W) * size / (size + 32))."""
  scale = min(height, width) / (size + FALLBACK_CROP_MARGIN)
  side = max(1, int(scale * size))
  return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, size: int,
                            area_range: Tuple[float, float] = (0.08, 1.0),
                            aspect_range: Tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> Box:
  """A distorted crop box, or the centre fallback when sampling fails or returns the whole image.

  Like the reference, a sampled box equal to the whole image is treated as a failure too (TensorFlow
  signals failure by returning the whole image, and the reference tests for exactly that).
  """
  if height <= 0 or width <= 0:
    raise ValueError(f'Image must be non-empty, got {height}x{width}.')
  if not 0 < area_range[0] <= area_range[1] <= 1:
    raise ValueError(f'area_range must satisfy 0 < low <= high <= 1, got {area_range}.')
  if not 0 < aspect_range[0] <= aspect_range[1]:
    raise ValueError(f'aspect_range must satisfy 0 < low <= high, got {aspect_range}.')
  box = sample_distorted_box(height, width, rng, area_range, aspect_range, attempts)
  if box is None or (box[2] == height and box[3] == width):
    return center_fallback_box(height, width, size)
  return box


def _draft_scale(crop_h: int, crop_w: int, size: int) -> int:
  """Largest JPEG DCT reduction (1, 2, 4, 8) after which the crop still has >= size pixels a side."""
  for scale in (8, 4, 2):
    if min(crop_h, crop_w) >= scale * size:
      return scale
  return 1


def crop_and_resize(image: Image.Image, box: Box, size: int) -> np.ndarray:
  """Decodes `image` (lazily opened) at a reduced DCT scale if possible, crops `box`, resizes bicubic."""
  top, left, crop_h, crop_w = box
  width, height = image.size
  scale = _draft_scale(crop_h, crop_w, size) if image.format == 'JPEG' else 1
  if scale > 1:
    # Asking for W // scale makes Pillow pick exactly `scale` (W // (W // s) is in [s, 2s) for W > 2s).
    image.draft('RGB', (width // scale, height // scale))
    # DCT scaling maps source pixel x to x / s whatever the rounding of the decoded size.
    scale = round(width / image.size[0])
  image = _to_rgb(image)
  resample_box = (left / scale, top / scale, (left + crop_w) / scale, (top + crop_h) / scale)
  return np.asarray(image.resize((size, size), Image.BICUBIC, box=resample_box))


def decode_random_resized_crop(image_bytes: bytes, rng: np.random.Generator, size: int,
                               area_range: Tuple[float, float] = (0.08, 1.0),
                               aspect_range: Tuple[float, float] = (3 / 4, 4 / 3),
                               attempts: int = 10) -> np.ndarray:
  """Training crop: samples a box from the header's size, decodes only as much as needed.

  Returns uint8 [size, size, 3]. The box follows `random_resized_crop_box` (reference sampler with its
  centre-crop fallback); the resize is Pillow's bicubic.
  """
  if size <= 0:
    raise ValueError(f'Crop size must be positive, got {size}.')
  image = _open(image_bytes)
  width, height = image.size
  box = random_resized_crop_box(height, width, rng, size, area_range, aspect_range, attempts)
  return crop_and_resize(image, box, size)


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors an HWC image left-right with probability 1/2."""
  if rng.random() < 0.5:
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
      # Pillow's transpose is ~3x faster than numpy's copy of a reversed view of 3-byte pixels.
      return np.asarray(Image.fromarray(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return np.ascontiguousarray(image[:, ::-1])
  return image


def _keys_cubic(distance: np.ndarray, a: float = -0.5) -> np.ndarray:
  d = np.abs(distance)
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.where(d < 1, near, np.where(d < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def tf_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 weights of TF's non-antialiased bicubic resize along one axis.

  Half-pixel centres: output i samples input coordinate (i + 0.5) * in / out; taps that fall outside
  the image are dropped and the remaining weights renormalised (TF's scale_and_translate).
  """
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f'Resize sizes must be positive, got {in_size} -> {out_size}.')
  sample = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size)
  source = np.arange(in_size, dtype=np.float64) + 0.5
  weights = _keys_cubic(source[None, :] - sample[:, None])
  weights /= weights.sum(axis=1, keepdims=True)
  weights = weights.astype(np.float32)
  weights.flags.writeable = False
  return weights


def tf_bicubic_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes HWC `image` to [height, width, C] float32 like tf.image.resize bicubic, unclipped."""
  if image.ndim != 3:
    raise ValueError(f'Expected an HWC image, got shape {image.shape}.')
  in_h, in_w, channels = image.shape
  rows = tf_bicubic_weights(in_h, height)
  cols = tf_bicubic_weights(in_w, width)
  pixels = image.astype(np.float32, copy=False).reshape(in_h, in_w * channels)
  resized_rows = (rows @ pixels).reshape(height, in_w, channels)
  return np.matmul(cols[None], resized_rows)


def eval_resize_and_crop(image: np.ndarray, resolution: int, margin: int = 32) -> np.ndarray:
  """Eval transform: resize the whole image (aspect not kept) to (res + margin)^2, centre crop res.

  Returns float32 [resolution, resolution, 3], not clipped (bicubic overshoots are kept, as in the
  reference). The crop offset is (margin + 1) // 2 on both axes.
  """
  if resolution <= 0 or margin < 0:
    raise ValueError(f'Need resolution > 0 and margin >= 0, got {resolution} and {margin}.')
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'Expected an HWC RGB image, got shape {image.shape}.')
  full = resolution + margin
  offset = (full - resolution + 1) // 2
  rows = tf_bicubic_weights(image.shape[0], full)[offset:offset + resolution]
  cols = tf_bicubic_weights(image.shape[1], full)[offset:offset + resolution]
  # Only the kept rows/columns are computed: cropping the weight matrices is the same as cropping after.
  pixels = image.astype(np.float32, copy=False).reshape(image.shape[0], -1)
  resized_rows = (rows @ pixels).reshape(resolution, image.shape[1], 3)
  return np.matmul(cols[None], resized_rows)


@functools.lru_cache(maxsize=16)
def _row_statistics(repeats: int) -> Tuple[np.ndarray, np.ndarray]:
  """MEAN_RGB and 1 / STDDEV_RGB tiled `repeats` times, read-only (one image row of pixels)."""
  mean, inv_stddev = np.tile(MEAN_RGB, repeats), np.tile(_INV_STDDEV_RGB, repeats)
  mean.flags.writeable = inv_stddev.flags.writeable = False
  return mean, inv_stddev


def normalize(images: np.ndarray) -> np.ndarray:
  """(x - mean) / std per RGB channel with ImageNet statistics on the 0-255 scale; float32 out."""
  images = np.asarray(images)
  if images.shape[-1] != 3:
    raise ValueError(f'Expected RGB images with a trailing channel axis of 3, got {images.shape}.')
  # In place on one fresh float32 copy. The statistics are tiled along whole rows ([..., W * 3]):
  # broadcasting a trailing axis of 3 makes numpy run its inner loop 3 elements at a time, which
  # is several times slower on a batch. Same operations in the same order, so bit-identical.
  normalized = np.empty(images.shape, np.float32)
  repeats = images.shape[-2] if images.ndim >= 2 else 1
  rows = normalized.reshape(-1, repeats * 3)
  rows[...] = images.reshape(rows.shape)
  mean, inv_stddev = _row_statistics(repeats)
  rows -= mean
  rows *= inv_stddev
  return normalized
