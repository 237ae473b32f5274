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
(size, coefficients) and cached. Applying it: a whole-pixel translation is a Pillow paste; a map that
keeps rows (ShearX) is one shifted copy per row plus the few pixels where a float32 tie breaks the
row's shift; anything else (Rotate, ShearY) one gather. The numpy work runs on Pillow's own 4-byte
pixel layout (RGBX), so an image leaves and re-enters Pillow without repacking.
"""
import functools
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

Affine = Tuple[float, float, float, float, float, float]

# Index maps kept per process: 6 per training resolution at a fixed magnitude (Rotate, ShearX and
# ShearY, two signs each; whole-pixel translations need none), 0.3 MB each at 192^2, 1.8 MB at 480^2.
_CACHE_SIZE = 32


@functools.lru_cache(maxsize=_CACHE_SIZE)
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


def _source_indices(height: int, width: int, coefficients: Affine) -> np.ndarray:
  """[H, W] flat input pixel index of every output pixel; height * width stands for the fill colour."""
  a, b, c, d, e, f = (np.float32(v) for v in coefficients)
  rows = np.arange(height, dtype=np.float32)[:, None]
  columns = np.arange(width, dtype=np.float32)[None, :]
  source_x = _round_half_away((a * columns + b * rows) + c)
  source_y = _round_half_away((d * columns + e * rows) + f)
  inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
  return np.where(inside, source_y * width + source_x, height * width).astype(np.intp)


class _Gather(NamedTuple):
  """Any transform: output = pixels[indices] with the fill appended as pixel height * width."""
  indices: np.ndarray


class _RowWindows(NamedTuple):
  """A transform that keeps rows (ShearX): output row y = a window of input row y, shifted by a
  whole number of columns, into the row padded with `pad` fill pixels per side; `fix_at` lists the
  output pixels (at most a few hundred: float32 ties) that read `fix_from` of the padded image instead.
  Row copies run at memory speed, a per-pixel gather does not."""
  pad: int
  starts: np.ndarray
  fix_at: np.ndarray
  fix_from: np.ndarray


def _row_windows(indices: np.ndarray) -> Optional[_RowWindows]:
  height, width = indices.shape
  inside = indices < height * width
  if not inside.any(axis=1).all():
    return None  # A row entirely outside would need padding wider than the image.
  columns = np.arange(width)
  source_columns = np.where(inside, indices - np.arange(height)[:, None] * width, -1)
  shifts = np.array([_most_common(row[ok] - columns[ok]) for row, ok in zip(source_columns, inside)])
  pad = int(np.abs(shifts).max()) + 1
  if pad > width:
    return None
  window_columns = columns[None, :] + shifts[:, None]
  window_inside = (window_columns >= 0) & (window_columns < width)
  wrong = np.where(inside, ~window_inside | (source_columns != window_columns), window_inside)
  padded_width = width + 2 * pad
  fix_rows, fix_columns = np.nonzero(wrong)
  # A pixel that should be fill reads padding column 0.
  fix_from = fix_rows * padded_width + np.where(inside[wrong], source_columns[wrong] + pad, 0)
  starts = np.arange(height) * padded_width + pad + shifts
  arrays = [starts.astype(np.intp), (fix_rows * width + fix_columns).astype(np.intp),
            fix_from.astype(np.intp)]
  for array in arrays:  # Cached and shared by every call.
    array.setflags(write=False)
  return _RowWindows(pad, *arrays)


def _most_common(values: np.ndarray) -> int:
  unique, counts = np.unique(values, return_counts=True)
  return int(unique[counts.argmax()])


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _plan(height: int, width: int, coefficients: Affine):
  """Row windows where the transform keeps rows (ShearX), else a gather. (ShearY on the transposed
  image would be row windows too, but Pillow's two transposes cost more than the gather.)"""
  indices = _source_indices(height, width, coefficients)
  if coefficients[3:] == (0.0, 1.0, 0.0):
    windows = _row_windows(indices)
    if windows is not None:
      return windows
  indices = indices.ravel()
  indices.setflags(write=False)
  return _Gather(indices)


def _to_pixels(image: Image.Image) -> np.ndarray:
  # Pillow keeps RGB as 4 bytes a pixel (RGBX): one uint32 a pixel, no repacking either way.
  return np.frombuffer(image.tobytes('raw', 'RGBX'), np.uint32).reshape(image.height, image.width)


def _from_pixels(pixels: np.ndarray) -> Image.Image:
  return Image.frombytes('RGB', pixels.shape[::-1], pixels, 'raw', 'RGBX')


def _apply(pixels: np.ndarray, plan, fill: np.uint32) -> np.ndarray:
  height, width = pixels.shape
  if isinstance(plan, _Gather):
    flat = np.empty(height * width + 1, np.uint32)
    flat[:-1] = pixels.ravel()
    flat[-1] = fill
    return flat[plan.indices].reshape(height, width)  # Indexing beats np.take by ~20 % here.
  padded = np.full((height, width + 2 * plan.pad), fill, np.uint32)
  padded[:, plan.pad:plan.pad + width] = pixels
  flat = padded.ravel()
  # Every run of `width` pixels of the padded image, as a view (numpy's own helper for this view
  # costs more than the row copies).
  windows = np.ndarray((flat.size - width + 1, width), np.uint32, flat, 0, (4, 4))
  out = windows[plan.starts]
  out.ravel()[plan.fix_at] = flat[plan.fix_from]
  return out


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
  fill_pixel = np.frombuffer(bytes(fill) + b'\xff', np.uint32)[0]
  return _from_pixels(_apply(_to_pixels(image), _plan(height, width, key), fill_pixel))
