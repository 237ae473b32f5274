"""A synthetic dataset that needs no storage: deterministic striped PNGs with learnable labels.

For benchmarks and for tests that need images of any count without preparing a dataset.
"""
import io
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from nfnets.data import sources
from nfnets.errors import ConfigError

NAME = 'synthetic'
NUM_CLASSES = 10
IMAGE_SIZE = 64
NUM_EXAMPLES = {'train': 1024, 'validation': 256, 'test': 256}
# Each split draws from its own stream so that train and evaluation images differ.
_SPLIT_STREAMS = {'train': 0, 'validation': 1, 'test': 2}


class SyntheticSource(Sequence):
  """Deterministic PNG images with learnable labels, generated on demand.

  Class k is a striped pattern at angle k·180°/C in its own colour over mild noise; the stripe
  phase, frequency jitter and noise vary per example. Examples depend only on (stream, index),
  so the source needs no storage and pickles into data-loading workers.
  """

  def __init__(self, num_examples: int, *, stream: int = 0,
               num_classes: int = NUM_CLASSES, image_size: int = IMAGE_SIZE):
    if num_examples <= 0 or num_classes <= 0 or image_size <= 0:
      raise ValueError('SyntheticSource needs positive num_examples, num_classes and image_size.')
    self._num_examples = num_examples
    self._stream = stream
    self.num_classes = num_classes
    self.image_size = image_size

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -self._num_examples <= index < self._num_examples:
      raise IndexError(f'index {index} out of range for {self._num_examples} examples')
    index %= self._num_examples
    label = index % self.num_classes
    rng = np.random.default_rng([self._stream, index])
    return {'image': _encode_png(self._draw(label, rng)), 'label': label}

  def _draw(self, label: int, rng: np.random.Generator) -> np.ndarray:
    size = self.image_size
    angle = np.pi * label / self.num_classes
    frequency = (3.0 + rng.uniform(-0.5, 0.5)) * 2 * np.pi / size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    along = xs * np.cos(angle) + ys * np.sin(angle)
    stripes = 0.5 + 0.5 * np.sin(frequency * along + rng.uniform(0, 2 * np.pi))
    hue = label / self.num_classes
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    image = 30 + 200 * stripes[..., None] * colour + rng.normal(0, 8, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def source(split: str, data_dir: Optional[str] = None) -> SyntheticSource:
  del data_dir  # generated, not stored
  if split not in NUM_EXAMPLES:
    raise ConfigError(f'Unknown synthetic split {split!r}; use one of {sorted(NUM_EXAMPLES)}.')
  return SyntheticSource(NUM_EXAMPLES[split], stream=_SPLIT_STREAMS[split])


DATASET = sources.register(sources.Dataset(
    name=NAME,
    num_classes=NUM_CLASSES,
    num_examples=NUM_EXAMPLES,
    source=source,
    preparation='nothing to prepare: the images are generated on demand',
    data_config={'train_split': 'train', 'eval_split': 'validation'},
))
