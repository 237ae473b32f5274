"""TensorFlow's projective-transform kernel (nearest neighbour, constant fill) on uint8 RGB images.

The reference's Rotate, ShearX/ShearY and TranslateX/TranslateY ran TF's `ImageProjectiveTransform`
op. For an affine transform (a, b, c, d, e, f) it fills the output pixel at column x, row y (integer
indices, not pixel centres) from the input at

    u = (a * x + b * y) + c,    v = (d * x + e * y) + f,

evaluated in float32 one operation at a time, each coordinate rounded half away from zero
(`std::round`); a point that rounds outside the image gets the fill colour. Pillow's affine transform
instead samples at pixel centres in fixed point, which moves a sheared image's pixels by one column
on 9-20 % of them, and even with shifted coefficients it settles the many exact float32 ties
(u = k + 1/2, thousands per sheared image) differently.

Which input pixel lands where depends only on the image size and the six coefficients, and RandAugment
uses few of them (a fixed magnitude with two signs per op), so the map is computed once per
(size, coefficients) and cached; applying an op is then one gather. The gather runs on Pillow's own
4-byte pixel layout (RGBX), so an image leaves and re-enters Pillow without repacking.
"""
import functools
import math
from typing import Sequence, Tuple

import numpy as np
from PIL import Image

Affine = Tuple[float, float, float, float, float, float]

# Index maps kept per process: 10 per training resolution at a fixed magnitude (5 ops x 2 signs),
# 0.3 MB each at 192^2, 1.8 MB at 480^2.
_CACHE_SIZE = 32


def rotation(radians: float, height: int, width: int) -> Affine:
  """TF's rotation about the image centre ((width - 1) / 2, (height - 1) / 2), in float32."""
  angle = np.float32(radians)
  # float32 cos/sin of the float32 angle, correctly rounded (TF evaluates a one-element tensor's cos
  # with the C library's cosf).
  cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
  last_x, last_y = np.float32(width - 1), np.float32(height - 1)
  x_offset = (last_x - (cos * last_x - sin * last_y)) / np.float32(2)
  y_offset = (last_y - (sin * last_x + cos * last_y)) / np.float32(2)
  return tuple(float(v) for v in (cos, -sin, x_offset, sin, cos, y_offset))


def _round_half_away(values: np.ndarray) -> np.ndarray:
  # Exact: a float32 plus 0.5 is exact in float64 (adding 0.5 in float32 would itself round).
  wide = values.astype(np.float64)
  return np.trunc(wide + np.copysign(0.5, wide))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _source_indices(height: int, width: int, coefficients: Affine) -> np.ndarray:
  """Flat input pixel index of every output pixel; height * width stands for the fill colour."""
  a, b, c, d, e, f = (np.float32(v) for v in coefficients)
  rows = np.arange(height, dtype=np.float32)[:, None]
  columns = np.arange(width, dtype=np.float32)[None, :]
  source_x = _round_half_away((a * columns + b * rows) + c)
  source_y = _round_half_away((d * columns + e * rows) + f)
  inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
  indices = np.where(inside, source_y * width + source_x, height * width).astype(np.intp).ravel()
  indices.setflags(write=False)
  return indices


def transform(image: Image.Image, coefficients: Sequence[float],
              fill: Tuple[int, int, int]) -> Image.Image:
  """Output pixel (x, y) = input pixel nearest to the affine image of (x, y), as TF computes it."""
  width, height = image.size
  key = tuple(float(np.float32(v)) for v in coefficients)
  if len(key) != 6:
    raise ValueError(f'An affine transform has 6 coefficients, got {len(key)}.')
  a, b, c, d, e, f = key
  if (a, b, d, e) == (1.0, 0.0, 0.0, 1.0) and c.is_integer() and f.is_integer():
    # A whole-pixel translation reads input (x + c, y + f) exactly: a copy, done by Pillow.
    shifted = Image.new('RGB', image.size, fill)
    shifted.paste(image, (-int(c), -int(f)))
    return shifted
  indices = _source_indices(height, width, key)
  pixels = np.empty(height * width + 1, np.uint32)
  pixels[:-1] = np.frombuffer(image.tobytes('raw', 'RGBX'), np.uint32)
  pixels[-1:] = np.frombuffer(bytes(fill) + b'\xff', np.uint32)
  return Image.frombytes('RGB', image.size, np.take(pixels, indices), 'raw', 'RGBX')
