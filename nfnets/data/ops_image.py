"""Host-side image transforms: decode, random-resized crop, eval resize, normalise.

Everything here is numpy (plus a JPEG decoder) and runs inside the input workers. Decoding and
resizing reproduce TensorFlow's, as the reference ran them, bit for bit:

- JPEGs are decoded by libjpeg-turbo (through simplejpeg) with the fast integer IDCT (IFAST) and fancy
  chroma upsampling, what `tf.io.decode_jpeg` and `tf.image.decode_and_crop_jpeg` do by default.
  Pillow's decoder uses the accurate IDCT (ISLOW) and differs by about 1 grey level on average. Other
  formats (the PNGs of the digits and synthetic datasets) and JPEGs that libjpeg-turbo reports as
  damaged are decoded by Pillow.
- Resizes are TF's bicubic without antialiasing (`nfnets.data.bicubic`), in float32, unclipped.

Training crops follow the reference: a box from TensorFlow's `sample_distorted_bounding_box` rule
(whole image as the only box, then the centre-crop fallback), cut from the image decoded at full
resolution, mirrored with probability 1/2, resized to the training resolution. (The reference decoded
only the window, `decode_and_crop_jpeg`, whose chroma upsampling treats the window's edges as the
image's: its first and last pixel columns can differ from a cut-out of the full decode.) Evaluation
(`eval_pixels`) resizes the whole image to (res + margin)^2 and takes the centre crop; `eval_image`
also normalises.

Images are uint8 HWC RGB unless a docstring says otherwise.
"""
import functools
import io
import math
from typing import Optional, Tuple

import numpy as np
from PIL import Image
import simplejpeg

from nfnets.data import bicubic

# ImageNet channel statistics on the 0-255 scale.
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255
INV_STDDEV_RGB = 1 / STDDEV_RGB

# The reference's crop sampler also requires the crop to cover this fraction of the image (its
# `min_object_covered`), which tightens area_range's lower end from 0.08 to 0.1.
MIN_OBJECT_COVERED = 0.1
# Margin of the reference's centre-crop fallback: a square of side min(H, W) * size / (size + 32).
FALLBACK_CROP_MARGIN = 32

# (top, left, height, width) in pixels of the original image.
Box = Tuple[int, int, int, int]


_JPEG_MAGIC = b'\xff\xd8'


def decode_image(image_bytes: bytes) -> np.ndarray:
  """Decodes JPEG/PNG/... bytes into a uint8 [H, W, 3] RGB array, JPEGs exactly as TensorFlow does.

  Grayscale, CMYK, palette and RGBA images are converted to RGB.
  """
  if not isinstance(image_bytes, (bytes, bytearray, memoryview, np.bytes_)):
    raise TypeError(f'Expected encoded image bytes, got {type(image_bytes).__name__}.')
  data = bytes(image_bytes)
  if data.startswith(_JPEG_MAGIC):
    try:
      return simplejpeg.decode_jpeg(data, colorspace='RGB', fastdct=True, fastupsample=False)
    except ValueError:
      pass  # Damaged data (even recoverable damage): Pillow decodes it or reports it below.
  try:
    image = Image.open(io.BytesIO(data))
    return np.asarray(image if image.mode == 'RGB' else image.convert('RGB'))
  except Exception as e:  # Pillow raises several types for undecodable data.
    raise ValueError(f'Cannot decode image ({len(data)} bytes): {e}; '
                     'pass JPEG/PNG/other Pillow-readable bytes.') from e


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


def crop_and_resize(image: np.ndarray, box: Box, size: int, mirror: bool = False) -> np.ndarray:
  """Cuts `box` out of a decoded HWC image and resizes it to float32 [size, size, C] (TF bicubic).

  `mirror` flips the crop left-right before resizing (computed by the resize itself, at no cost).
  """
  top, left, crop_h, crop_w = box
  return bicubic.resize(image[top:top + crop_h, left:left + crop_w], size, size, mirror=mirror)


def decode_random_resized_crop(image_bytes: bytes, rng: np.random.Generator, size: int, *,
                               area_range: Tuple[float, float] = (0.08, 1.0),
                               aspect_range: Tuple[float, float] = (3 / 4, 4 / 3),
                               attempts: int = 10, random_flip: bool = False) -> np.ndarray:
  """The reference's training crop: float32 [size, size, 3], unclipped.

  The image is decoded at full resolution, the box follows `random_resized_crop_box`, then with
  `random_flip` the crop is mirrored with probability 1/2, and it is resized with TF's bicubic.
  """
  if size <= 0:
    raise ValueError(f'Crop size must be positive, got {size}.')
  image = decode_image(image_bytes)
  box = random_resized_crop_box(image.shape[0], image.shape[1], rng, size, area_range,
                                aspect_range, attempts)
  mirror = bool(random_flip and rng.random() < 0.5)
  return crop_and_resize(image, box, size, mirror=mirror)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Clips float pixels to [0, 255] and truncates to uint8, as the reference did before RandAugment."""
  return np.clip(images, 0, 255).astype(np.uint8)


def eval_resize_and_crop(image: np.ndarray, resolution: int, margin: int = 32) -> np.ndarray:
  """Eval transform: resize the whole image (aspect not kept) to (res + margin)^2, centre crop res.

  Returns float32 [resolution, resolution, 3], not clipped (bicubic overshoots are kept, as in the
  reference). The crop offset is (margin + 1) // 2 on both axes; only the kept pixels are computed.
  """
  if resolution <= 0 or margin < 0:
    raise ValueError(f'Need resolution > 0 and margin >= 0, got {resolution} and {margin}.')
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'Expected an HWC RGB image, got shape {image.shape}.')
  full = resolution + margin
  offset = (full - resolution + 1) // 2
  window = (offset, offset + resolution)
  return bicubic.resize(image, full, full, rows=window, cols=window)


def eval_pixels(image_bytes: bytes, resolution: int, margin: int = 32) -> np.ndarray:
  """The reference's evaluation preprocessing of one encoded image up to normalisation: float32 [res, res, 3].

  Decode (JPEG as TF does) -> TF bicubic resize to (res + margin)^2, unclipped -> centre crop with
  offset (margin + 1) // 2. The values are pixels on the 0-255 scale but fractional and may overshoot
  [0, 255], so they stay float32: rounding them to uint8 would change the evaluation. The eval pipeline
  sends these; the eval step normalises them on the device.
  """
  return eval_resize_and_crop(decode_image(image_bytes), resolution, margin)


def eval_image(image_bytes: bytes, resolution: int, margin: int = 32) -> np.ndarray:
  """`eval_pixels` normalised, (x - mean) / std: what a model is applied to (e.g. by scripts/classify.py)."""
  return normalize(eval_pixels(image_bytes, resolution, margin))


@functools.lru_cache(maxsize=16)
def _row_statistics(repeats: int) -> Tuple[np.ndarray, np.ndarray]:
  """MEAN_RGB and 1 / STDDEV_RGB tiled `repeats` times, read-only (one image row of pixels)."""
  mean, inv_stddev = np.tile(MEAN_RGB, repeats), np.tile(INV_STDDEV_RGB, repeats)
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
