"""TensorFlow 2's `tf.image.resize(..., method='bicubic')` (no antialiasing), bit for bit, in numpy.

The reference resized every training crop and evaluation image with TF's ResizeBicubic kernel
(half-pixel centres, Keys' cubic with a = -0.5). Its arithmetic is reproduced, not approximated:

- each output pixel reads 4 input pixels along an axis, whatever the scale (no antialiasing:
  shrinking does not widen the kernel);
- the weights are not the cubic at the exact sample position but entries of a 1025-entry table of
  it at 1/1024-pixel steps (the position's fraction is rounded half-to-even to a slot);
- taps that fall outside the image get weight 0 and the rest are renormalised;
- rows are combined first, then columns, each as w0 x0 + w1 x1 + w2 x2 + w3 x3 in float32.

Each axis is a cached sparse matrix (4 weights per output row, in TF's tap order), so a resize is
two sparse products (scipy's CSR kernel adds a row's terms in stored order, TF's order) with a
transpose between them. On the fixtures in tests/fixtures (TensorFlow 2.21) the outputs equal TF's
exactly; the exact cubic (what jax.image.resize evaluates) is off by up to ~0.2 grey levels.
"""
import functools
from typing import Optional

import numpy as np
import scipy.sparse

_TABLE_SIZE = 1024
_KEYS_A = -0.5


def _coefficient_table() -> tuple[np.ndarray, np.ndarray]:
  """TF's table: the cubic at x and x + 1 for x = i / 1024, computed in double, kept in float32."""
  x = (np.arange(_TABLE_SIZE + 1) / _TABLE_SIZE).astype(np.float32)
  near_x = x.astype(np.float64)
  near = ((_KEYS_A + 2) * near_x - (_KEYS_A + 3)) * near_x * near_x + 1
  far_x = (x + np.float32(1)).astype(np.float64)
  far = ((_KEYS_A * far_x - 5 * _KEYS_A) * far_x + 8 * _KEYS_A) * far_x - 4 * _KEYS_A
  return near.astype(np.float32), far.astype(np.float32)


_NEAR, _FAR = _coefficient_table()


def taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices int64 [out, 4], weights float32 [out, 4]) of one axis; out-of-range taps have weight 0.

  Indices of out-of-range taps are clamped into the image (their weight is 0 either way).
  """
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f'Resize sizes must be positive, got {in_size} -> {out_size}.')
  scale = np.float32(in_size) / np.float32(out_size)
  position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  base = np.floor(position).astype(np.int64)
  fraction = position - base.astype(np.float32)
  slot = np.rint(fraction * np.float32(_TABLE_SIZE)).astype(np.int64)
  weights = np.stack([_FAR[slot], _NEAR[slot], _NEAR[_TABLE_SIZE - slot],
                      _FAR[_TABLE_SIZE - slot]], axis=1)
  indices = base[:, None] + np.arange(-1, 3)
  weights[(indices < 0) | (indices >= in_size)] = 0
  total = ((weights[:, 0] + weights[:, 1]) + weights[:, 2]) + weights[:, 3]
  weights *= (np.float32(1) / total)[:, None]
  return np.clip(indices, 0, in_size - 1), weights


@functools.lru_cache(maxsize=4096)
def resize_matrix(in_size: int, out_size: int, start: int = 0, stop: Optional[int] = None,
                  mirror: bool = False) -> scipy.sparse.csr_matrix:
  """float32 [stop - start, in_size] sparse matrix of output rows start..stop of one axis.

  `mirror` resizes the reversed axis: multiplying the original input by it equals TF's resize of the
  flipped input, bit for bit (same weights, same order of the terms).
  """
  stop = out_size if stop is None else stop
  if not 0 <= start < stop <= out_size:
    raise ValueError(f'Need 0 <= start < stop <= {out_size}, got {start}, {stop}.')
  indices, weights = taps(in_size, out_size)
  indices, weights = indices[start:stop], weights[start:stop]
  if mirror:
    indices = in_size - 1 - indices
  keep = weights != 0  # Zero-weight taps add exact zeros in TF; leaving them out changes nothing.
  row_lengths = keep.sum(axis=1)
  indptr = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int32)
  return scipy.sparse.csr_matrix(
      (weights[keep], indices[keep].astype(np.int32), indptr), shape=(stop - start, in_size))


# Transposes move whole pixels as single elements: several times faster than numpy's copy of a
# transposed [..., C] view, which runs its inner loop C floats at a time.
_PIXEL_DTYPES = {1: np.float32, 2: np.float64, 4: np.complex128}


def _transpose_pixels(image: np.ndarray) -> np.ndarray:
  """float32 [H, W, C] -> contiguous [W, H, C], moving each pixel's C floats as one element."""
  height, width, channels = image.shape
  pixel = _PIXEL_DTYPES.get(channels, np.dtype((np.void, 4 * channels)))
  pixels = np.ascontiguousarray(image).view(pixel).reshape(height, width)
  return np.ascontiguousarray(pixels.T).view(np.float32).reshape(width, height, channels)


def resize(image: np.ndarray, height: int, width: int, *, mirror: bool = False,
           rows: Optional[tuple[int, int]] = None,
           cols: Optional[tuple[int, int]] = None) -> np.ndarray:
  """Resizes HWC `image` (any real dtype) to [height, width, C] float32, unclipped, as TF does.

  Args:
    image: [H, W, C] pixels; uint8 crops of a larger array may be passed as views.
    height, width: the size TF would resize to.
    mirror: resize the left-right mirrored image instead (TF's flip, then resize).
    rows, cols: (start, stop) of the output rows / columns to compute, e.g. a centre crop of the
      resized image; only those are computed.

  Returns:
    float32 [rows[1] - rows[0], cols[1] - cols[0], C] (the whole [height, width, C] by default).
  """
  if image.ndim != 3:
    raise ValueError(f'Expected an HWC image, got shape {image.shape}.')
  in_h, in_w, channels = image.shape
  row_matrix = resize_matrix(in_h, height, *(rows or (0, height)))
  col_matrix = resize_matrix(in_w, width, *(cols or (0, width)), mirror=mirror)
  pixels = image.astype(np.float32).reshape(in_h, in_w * channels)
  resized_rows = (row_matrix @ pixels).reshape(-1, in_w, channels)
  # The columns are the leading axis after a transpose, so both passes are sparse row products.
  resized = col_matrix @ _transpose_pixels(resized_rows).reshape(in_w, -1)
  return _transpose_pixels(resized.reshape(col_matrix.shape[0], -1, channels))
