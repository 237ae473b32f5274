"""RandAugment (Cubuk et al. 2019) with the reference's 16 ops and magnitude mappings, on uint8.

`randaugment(image, rng, num_layers, magnitude, semantics)` applies `num_layers` ops, each drawn
uniformly from `OPS` and always applied, at the shared magnitude M (out of `MAX_LEVEL` = 10; larger M,
e.g. the 15 of F3-F7, extrapolates every mapping linearly). Empty pixels of geometric ops and Cutout
are filled with grey 128. Every magnitude -> argument rule lives in `LEVEL_TO_ARG`; the mappings and
the op semantics follow the TensorFlow (tensorflow/tpu autoaugment) code the reference used.

Two ops behaved in the reference's TensorFlow code, run on uint8 images, differently from what their
names promise. `semantics='reference'` (the default, and what the paper's models were trained with)
reproduces that; `'corrected'` does what the ops are meant to do:

| op | argument at magnitude M | 'reference' | 'corrected' |
|---|---|---|---|
| AutoContrast, Equalize, Invert | none | same | same |
| Rotate | 30 * M / 10 degrees, random sign | same | same |
| Posterize | keep int(4 * M / 10) high bits (at least 1, as TF clamps the shift to 7) | same | same |
| Solarize | threshold t = int(256 * M / 10); pixels >= t inverted | t cast to uint8 (t mod 256): M=5 and M=15 invert >= 128, M=10 inverts every pixel | t as is: M=10 and above invert nothing |
| SolarizeAdd | add int(110 * M / 10) to pixels < 128, clip | same | same |
| Color, Brightness, Sharpness | blend factor 1.8 * M / 10 + 0.1 (1 = identity) | same | same |
| Contrast | blend factor as above, towards a grey level | (pixel count) / 256 clipped to 255, truncated: 144 at 192^2, 196 at 224^2, 255 from 256^2 up | the image's mean grey (Pillow) |
| ShearX, ShearY | 0.3 * M / 10, random sign | same | same |
| TranslateX, TranslateY | 100 * M / 10 pixels, random sign, NOT scaled by image size | same | same |
| Cutout | grey square of half-side int(40 * M / 10) px, centre uniform, clipped | same | same |

Every op computes what the reference's TensorFlow op computed on uint8 images, pixel for pixel:
Rotate, ShearX/ShearY and TranslateX/TranslateY go through TF's projective-transform rule
(`nfnets.data.projective`: float32 coordinates of pixel indices, rounded half away from zero, fill
outside); the enhance ops blend in float32 and truncate as TF's `blend` did, Color towards
`tf.image.rgb_to_grayscale`'s grey (float32 weights 0.2989, 0.5870, 0.1140, back to uint8 by x 255.5
and truncation), Sharpness towards the 3x3 smoothing [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 truncated
(floor) with the border pixels kept, Brightness towards black. docs/randaugment.md gives the rule of
each op and how it is tested.
"""
import functools
import math
from typing import Any, Callable, Dict, Tuple

import numpy as np
from PIL import Image

from nfnets.data import projective

MAX_LEVEL = 10.0
FILL = (128, 128, 128)
TRANSLATE_CONST = 100.0
CUTOUT_CONST = 40.0

SEMANTICS = ('reference', 'corrected')

OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
       'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout',
       'SolarizeAdd')


def _random_sign(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _enhance_factor(m: float, rng: np.random.Generator) -> float:
  del rng
  return m / MAX_LEVEL * 1.8 + 0.1


def _no_arg(m: float, rng: np.random.Generator) -> None:
  del m, rng


# The one table of magnitude -> op argument rules (M may be fractional or above MAX_LEVEL).
LEVEL_TO_ARG: Dict[str, Callable[[float, np.random.Generator], Any]] = {
    'AutoContrast': _no_arg,
    'Equalize': _no_arg,
    'Invert': _no_arg,
    'Rotate': lambda m, rng: _random_sign(m / MAX_LEVEL * 30.0, rng),
    'Posterize': lambda m, rng: int(m / MAX_LEVEL * 4),
    'Solarize': lambda m, rng: int(m / MAX_LEVEL * 256),
    'SolarizeAdd': lambda m, rng: int(m / MAX_LEVEL * 110),
    'Color': _enhance_factor,
    'Contrast': _enhance_factor,
    'Brightness': _enhance_factor,
    'Sharpness': _enhance_factor,
    'ShearX': lambda m, rng: _random_sign(m / MAX_LEVEL * 0.3, rng),
    'ShearY': lambda m, rng: _random_sign(m / MAX_LEVEL * 0.3, rng),
    'TranslateX': lambda m, rng: _random_sign(m / MAX_LEVEL * TRANSLATE_CONST, rng),
    'TranslateY': lambda m, rng: _random_sign(m / MAX_LEVEL * TRANSLATE_CONST, rng),
    'Cutout': lambda m, rng: int(m / MAX_LEVEL * CUTOUT_CONST),
}


def _lookup(image: Image.Image, table) -> Image.Image:
  # One 256-entry table per band of Python ints, applied in C. Image.point would first re-round all
  # 768 entries in Python on every call (twice the cost of the lookup itself), so the tables, which
  # are ints already, go straight to the image core when this Pillow exposes it.
  table = table if len(table) == 768 else list(table) * 3
  image.load()
  core_point = getattr(getattr(image, 'im', None), 'point', None)
  if core_point is None:
    return image.point(table)
  return image._new(core_point(table, None))  # pylint: disable=protected-access


@functools.lru_cache(maxsize=None)
def _cached_table(kind: str, arg: int) -> Tuple[int, ...]:
  values = np.arange(256)
  if kind == 'invert':
    table = 255 - values
  elif kind == 'posterize':
    # TF clamps the shift amount 8 - bits to [0, 7]: 0 bits keeps 1, more than 8 keeps all.
    table = values & ((0xFF << min(max(8 - arg, 0), 7)) & 0xFF)
  elif kind == 'solarize':
    table = np.where(values < arg, values, 255 - values)
  else:  # solarize_add below the reference's fixed threshold of 128.
    table = np.where(values < 128, np.clip(values + arg, 0, 255), values)
  return tuple(int(v) for v in table) * 3


# The ops: (PIL RGB image, argument from LEVEL_TO_ARG, numpy Generator) -> new PIL RGB image.


def auto_contrast(image, arg, rng):
  # Per channel, stretch [min, max] to [0, 255] (truncating), identity for a flat channel.
  values = np.arange(256, dtype=np.float32)
  tables = []
  for low, high in image.getextrema():
    if high > low:
      scale = 255.0 / (high - low)
      tables.append(np.clip(values * scale - low * scale, 0, 255).astype(np.int64))
    else:
      tables.append(values.astype(np.int64))
  return _lookup(image, np.concatenate(tables).tolist())


def equalize(image, arg, rng):
  # Pillow's/TF's rule: step = (pixels - count of the last non-empty bin) // 255, cumulative LUT.
  histograms = np.asarray(image.histogram(), np.int64).reshape(3, 256)
  tables = []
  for histogram in histograms:
    nonzero = histogram[histogram > 0]
    step = (nonzero.sum() - nonzero[-1]) // 255 if nonzero.size else 0
    if step == 0:
      tables.append(np.arange(256))
      continue
    cumulative = np.concatenate([[0], np.cumsum(histogram)[:-1]])
    tables.append(np.minimum((cumulative + step // 2) // step, 255))
  return _lookup(image, np.concatenate(tables).tolist())


def invert(image, arg, rng):
  return _lookup(image, _cached_table('invert', 0))


def rotate(image, degrees, rng):
  radians = degrees * (math.pi / 180.0)  # As the reference converted, in float64.
  return projective.transform(image, projective.rotation(radians, image.height, image.width), FILL)


def posterize(image, bits, rng):
  return _lookup(image, _cached_table('posterize', bits))


def solarize(image, threshold, rng):
  return _lookup(image, _cached_table('solarize', threshold))


def solarize_reference(image, threshold, rng):
  # The reference compared uint8 pixels with the threshold cast to uint8, which wraps 256 to 0.
  return _lookup(image, _cached_table('solarize', threshold % 256))


def solarize_add(image, addition, rng):
  return _lookup(image, _cached_table('solarize_add', addition))


def _blend(degenerate: Image.Image, image: Image.Image, factor: float) -> Image.Image:
  # factor 1 is exactly the input (M = 5 for every enhance op): skip the work.
  return image if factor == 1.0 else Image.blend(degenerate, image, factor)


# tf.image.rgb_to_grayscale's weights, applied by TF in float32.
_GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)
_INV_255 = np.float32(1 / 255)  # convert_image_dtype's scale, a float64 1/255 rounded to float32


def tf_grey(pixels: np.ndarray) -> np.ndarray:
  """tf.image.rgb_to_grayscale of uint8 [..., 3] pixels, as uint8 [...]."""
  # TF scales to [0, 1] by x float32(1/255), sums the weighted channels (left to right; another
  # order or an FMA changes 31-47 of the 2^24 colours), and converts back by x 255.5, truncating.
  # Pillow's convert('L') rounds integer weights instead: one level higher on 16-26 % of a photo.
  # One contiguous float32 plane per channel: twice as fast as working on interleaved pixels.
  total = None
  for channel, weight in enumerate(_GREY_WEIGHTS):
    term = pixels[..., channel].astype(np.float32)
    term *= _INV_255
    term *= weight
    if total is None:
      total = term
    else:
      total += term
  total *= np.float32(255.5)
  return total.astype(np.uint8)


def color(image, factor, rng):
  if factor == 1.0:  # Identity (M = 5): skip building the degenerate image too.
    return image
  grey = Image.fromarray(tf_grey(np.asarray(image)))
  return _blend(grey.convert('RGB'), image, factor)


def contrast(image, factor, rng):
  if factor == 1.0:
    return image
  mean = int(np.dot(image.convert('L').histogram(), np.arange(256)) / (image.width * image.height)
             + 0.5)
  return _blend(Image.new('RGB', image.size, (mean,) * 3), image, factor)


def contrast_reference(image, factor, rng):
  # The reference's TF op summed the grey histogram (the pixel count) and divided by 256 bins.
  if factor == 1.0:
    return image
  grey = int(min(np.float32(image.width * image.height) / np.float32(256), 255))
  return _blend(Image.new('RGB', image.size, (grey,) * 3), image, factor)


def brightness(image, factor, rng):
  if factor == 1.0:
    return image
  return _blend(Image.new('RGB', image.size, (0, 0, 0)), image, factor)


def tf_smooth(pixels: np.ndarray) -> np.ndarray:
  """The reference's Sharpness degenerate image of uint8 [H, W, 3] pixels (borders kept)."""
  # TF convolved the interior with [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 in float32 and truncated.
  # The exact value is S / 13 for the integer weighted sum S, within 1e-4 of TF's float32 result,
  # so truncation is floor(S / 13) (Pillow's SMOOTH rounds instead). Where S is a multiple of 13, TF's
  # own result depends on its CPU kernel (oneDNN on or off); floor keeps such pixels, e.g. a flat
  # region, unchanged. The 3x3 box sum is separable: column sums, then row sums.
  wide = pixels.astype(np.uint16)
  columns = wide[:-2] + wide[1:-1]
  columns += wide[2:]
  total = columns[:, :-2] + columns[:, 1:-1]
  total += columns[:, 2:]
  total += wide[1:-1, 1:-1] << 2
  smoothed = pixels.copy()
  smoothed[1:-1, 1:-1] = total // 13
  return smoothed


def sharpness(image, factor, rng):
  if factor == 1.0:
    return image
  return _blend(Image.fromarray(tf_smooth(np.asarray(image))), image, factor)


def shear_x(image, level, rng):
  return projective.transform(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), FILL)


def shear_y(image, level, rng):
  return projective.transform(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), FILL)


def translate_x(image, pixels, rng):
  return projective.transform(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), FILL)


def translate_y(image, pixels, rng):
  return projective.transform(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), FILL)


def cutout(image, half_size, rng):
  width, height = image.size
  center_y = int(rng.integers(0, height))
  center_x = int(rng.integers(0, width))
  if half_size <= 0:
    return image
  box = (max(0, center_x - half_size), max(0, center_y - half_size),
         min(width, center_x + half_size), min(height, center_y + half_size))
  image = image.copy()
  image.paste(FILL, box)
  return image


OP_FUNCTIONS: Dict[str, Callable[[Image.Image, Any, np.random.Generator], Image.Image]] = {
    'AutoContrast': auto_contrast, 'Equalize': equalize, 'Invert': invert, 'Rotate': rotate,
    'Posterize': posterize, 'Solarize': solarize, 'Color': color, 'Contrast': contrast,
    'Brightness': brightness, 'Sharpness': sharpness, 'ShearX': shear_x, 'ShearY': shear_y,
    'TranslateX': translate_x, 'TranslateY': translate_y, 'Cutout': cutout,
    'SolarizeAdd': solarize_add,
}
# The same ops with the reference's Solarize and Contrast (see the module docstring).
REFERENCE_OP_FUNCTIONS = dict(OP_FUNCTIONS, Solarize=solarize_reference, Contrast=contrast_reference)
_OP_FUNCTIONS = {'reference': REFERENCE_OP_FUNCTIONS, 'corrected': OP_FUNCTIONS}
assert set(OP_FUNCTIONS) == set(REFERENCE_OP_FUNCTIONS) == set(OPS) == set(LEVEL_TO_ARG)


def _check_image(image: np.ndarray) -> None:
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
      or image.shape[-1] != 3:
    got = (image.dtype, image.shape) if isinstance(image, np.ndarray) else type(image).__name__
    raise ValueError(f'RandAugment needs a uint8 [H, W, 3] array, got {got}.')


def _op_functions(semantics: str) -> Dict[str, Callable[[Image.Image, Any, np.random.Generator],
                                                          Image.Image]]:
  if semantics not in _OP_FUNCTIONS:
    raise ValueError(f'Unknown RandAugment semantics {semantics!r}; use one of {SEMANTICS}.')
  return _OP_FUNCTIONS[semantics]


def apply_op(image: np.ndarray, name: str, magnitude: float, rng: np.random.Generator,
             semantics: str = 'reference') -> np.ndarray:
  """Applies the single op `name` at `magnitude` to a uint8 HWC image (for tests and tools)."""
  _check_image(image)
  functions = _op_functions(semantics)
  if name not in functions:
    raise ValueError(f'Unknown RandAugment op {name!r}; choose one of {", ".join(OPS)}.')
  arg = LEVEL_TO_ARG[name](magnitude, rng)
  return np.asarray(functions[name](Image.fromarray(image), arg, rng))


def randaugment(image: np.ndarray, rng: np.random.Generator, num_layers: int, magnitude: float,
                semantics: str = 'reference') -> np.ndarray:
  """Applies `num_layers` ops drawn uniformly from `OPS` at `magnitude`; uint8 HWC in and out."""
  _check_image(image)
  functions = _op_functions(semantics)
  if num_layers < 0 or magnitude < 0:
    raise ValueError(f'Need num_layers >= 0 and magnitude >= 0, got {num_layers} and {magnitude}.')
  if num_layers == 0:
    return image
  pil_image = Image.fromarray(image)
  for op_index in rng.integers(0, len(OPS), size=num_layers):
    name = OPS[op_index]
    pil_image = functions[name](pil_image, LEVEL_TO_ARG[name](magnitude, rng), rng)
  return np.asarray(pil_image)
