"""The one place a duration in epochs, examples or steps becomes a number of optimizer steps.

The loop's length, the learning-rate warmup and any other schedule all go through `to_steps`, so they round the
same way: a duration covers at least the examples it names (ceil), e.g. NFNet-F0's 5 warmup epochs of 1,281,167
images at batch 4096 are 1,564 steps and its 360 epochs are 112,603 steps.
"""
import math
from typing import Optional

from nfnets.errors import ConfigError


def to_steps(*, steps: Optional[float] = None, epochs: Optional[float] = None, examples: Optional[float] = None,
             batch_size: int, examples_per_epoch: int, name: str = 'duration') -> int:
  """Steps for a duration given as exactly one of `steps`, `epochs` or `examples` (the others None).

  Args:
    steps, epochs, examples: the duration; exactly one is not None, and it must be >= 0.
    batch_size: global examples per step.
    examples_per_epoch: size of the training split.
    name: what the duration is, for error messages (e.g. 'train.epochs').
  """
  given = {k: v for k, v in dict(steps=steps, epochs=epochs, examples=examples).items() if v is not None}
  if len(given) != 1:
    raise ConfigError(f'{name}: give exactly one of steps, epochs or examples, got {sorted(given) or "none"}')
  (unit, value), = given.items()
  if value < 0:
    raise ConfigError(f'{name} must be >= 0, got {value} {unit}')
  if batch_size <= 0 or examples_per_epoch <= 0:
    raise ConfigError(f'batch size and examples per epoch must be positive, got {batch_size} and '
                      f'{examples_per_epoch}')
  if unit == 'steps':
    if value != int(value):
      raise ConfigError(f'{name} must be a whole number of steps, got {value}')
    return int(value)
  if unit == 'epochs':
    value = value * examples_per_epoch
  # Round first so that float noise (e.g. 0.1 * 30) does not add a step.
  return math.ceil(round(value / batch_size, 9))


def total_steps(train_config, examples_per_epoch: int) -> int:
  """The run's length: `train.num_steps` when > 0, else `train.epochs`."""
  steps = train_config.num_steps if train_config.num_steps > 0 else None
  steps_total = to_steps(steps=steps, epochs=None if steps else train_config.epochs,
                         batch_size=train_config.batch_size, examples_per_epoch=examples_per_epoch,
                         name='train.num_steps' if steps else 'train.epochs')
  if steps_total <= 0:
    raise ConfigError('the run has no steps: set train.epochs or train.num_steps > 0')
  return steps_total
