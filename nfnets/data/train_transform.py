"""One training example from encoded images, made the way the reference made it.

Per example, in the input workers (numpy and Pillow):

1. each of the example's crops (two with MixUp/CutMix, one without) is decoded at full resolution,
   cut with the reference's random-resized-crop box, mirrored with probability 1/2 and resized with
   TensorFlow's bicubic to float32, unclipped (`ops_image.decode_random_resized_crop`);
2. the two float crops are mixed, MixUp or CutMix by the example's position in its device's batch
   (`mix.mix_pair`), so every crop is used by exactly one example;
3. the result is clipped to [0, 255] and truncated to uint8;
4. RandAugment runs on the uint8 image (with `randaugment_after_mix=False` it runs on each uint8 crop
   before step 2 instead, as the reference's `augment_before_mix` did).

The example leaves as uint8 HWC with a float32 target; normalisation happens on the device
(`nfnets.train_step`). When RandAugment does not follow the mixing (off, or before it) the reference
kept the mixed image as unclipped floats; here it is still clipped and truncated, so that every
training batch travels as uint8.
"""
from typing import Any, Sequence

import ml_collections
import numpy as np

from nfnets.data import mix
from nfnets.data import ops_image
from nfnets.data import randaugment
from nfnets.errors import ConfigError

MIX_MODES = ('mixup_cutmix', 'none')


class TrainTransform:
  """Source examples -> one training example {'image': uint8 [R, R, 3], 'targets': float32 [K]}."""

  def __init__(self, *, resolution: int, num_classes: int, per_device: int,
               area_range: tuple[float, float] = (0.08, 1.0), flip: bool = True,
               mix_mode: str = 'mixup_cutmix', mixup_alpha: float = 0.2,
               randaugment_layers: int = 0, randaugment_magnitude: float = 10.0,
               randaugment_after_mix: bool = True, randaugment_semantics: str = 'reference'):
    if mix_mode not in MIX_MODES:
      raise ConfigError(f'Unknown config.data.mix {mix_mode!r}; use one of {MIX_MODES}.')
    if randaugment_semantics not in randaugment.SEMANTICS:
      raise ConfigError(f'Unknown config.data.randaugment_semantics {randaugment_semantics!r}; '
                        f'use one of {randaugment.SEMANTICS}.')
    if resolution <= 0 or num_classes <= 0 or per_device <= 0:
      raise ConfigError('resolution, num_classes and per_device must be positive, got '
                        f'{resolution}, {num_classes} and {per_device}.')
    self.resolution = resolution
    self.num_classes = num_classes
    self.per_device = per_device
    self.area_range = tuple(area_range)
    self.flip = flip
    self.mix_mode = mix_mode
    self.mixup_alpha = mixup_alpha
    self.randaugment_layers = randaugment_layers
    self.randaugment_magnitude = randaugment_magnitude
    self.randaugment_after_mix = randaugment_after_mix
    self.randaugment_semantics = randaugment_semantics

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict, *, num_classes: int,
                  per_device: int) -> 'TrainTransform':
    return cls(resolution=data_config.train_resolution, num_classes=num_classes,
               per_device=per_device, area_range=(data_config.crop_min_area, 1.0),
               flip=data_config.flip, mix_mode=data_config.mix,
               mixup_alpha=data_config.mixup_alpha,
               randaugment_layers=data_config.randaugment_layers,
               randaugment_magnitude=data_config.randaugment_magnitude,
               randaugment_after_mix=data_config.randaugment_after_mix,
               randaugment_semantics=data_config.get('randaugment_semantics', 'reference'))

  @property
  def crops_per_example(self) -> int:
    """How many source examples (crops) one training example is made from."""
    return 2 if self.mix_mode == 'mixup_cutmix' else 1

  def _randaugment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if not self.randaugment_layers:
      return image
    return randaugment.randaugment(image, rng, self.randaugment_layers,
                                   self.randaugment_magnitude, self.randaugment_semantics)

  def __call__(self, examples: Sequence[dict[str, Any]], position: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Makes the training example at `position` of its device's batch from `examples`.

    Args:
      examples: `crops_per_example` source examples {'image': encoded bytes, 'label': int}.
      position: the example's index in its device's batch (decides MixUp or CutMix).
      rng: the example's own generator (crop boxes, flips, mixing, RandAugment).
    """
    if len(examples) != self.crops_per_example:
      raise ValueError(f'Expected {self.crops_per_example} source examples per training example, '
                       f'got {len(examples)}.')
    labels = np.array([int(example['label']) for example in examples])
    targets = mix.one_hot(labels, self.num_classes)
    crops = [ops_image.decode_random_resized_crop(
        example['image'], rng, self.resolution, area_range=self.area_range,
        random_flip=self.flip) for example in examples]
    augment_first = not self.randaugment_after_mix
    if augment_first:
      crops = [self._randaugment(ops_image.to_uint8(crop), rng) for crop in crops]
    if self.mix_mode == 'mixup_cutmix':
      use_cutmix = mix.uses_cutmix(position, self.per_device)
      image, target = mix.mix_pair(crops, targets, use_cutmix, rng, self.mixup_alpha)
    else:
      image, target = crops[0], targets[0]
    image = ops_image.to_uint8(image)
    if not augment_first:
      image = self._randaugment(image, rng)
    return {'image': image, 'targets': target}
