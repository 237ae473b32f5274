"""The one epochs/examples/steps -> steps conversion, used by the loop's length and the warmup alike."""
import ml_collections
import pytest

from nfnets import durations
from nfnets import optim
from nfnets.errors import ConfigError

IMAGENET = 1_281_167


def test_units_convert_with_one_rounding_rule():
  assert durations.to_steps(epochs=5, batch_size=4096, examples_per_epoch=IMAGENET) == 1564
  assert durations.to_steps(epochs=360, batch_size=4096, examples_per_epoch=IMAGENET) == 112_603
  assert durations.to_steps(examples=4097, batch_size=4096, examples_per_epoch=IMAGENET) == 2
  assert durations.to_steps(steps=7, batch_size=4096, examples_per_epoch=IMAGENET) == 7
  # 0.1 * 30 is 3.0000000000000004 in floats: no extra step for float noise.
  assert durations.to_steps(epochs=0.1, batch_size=10, examples_per_epoch=300) == 3


@pytest.mark.parametrize('kwargs, message', [
    (dict(epochs=1, steps=2), 'exactly one'),
    (dict(), 'exactly one'),
    (dict(epochs=-1), '>= 0'),
    (dict(steps=1.5), 'whole number'),
])
def test_bad_durations_are_config_errors(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    durations.to_steps(batch_size=8, examples_per_epoch=100, **kwargs)


def test_warmup_and_total_agree_on_steps_per_epoch():
  # 1,000 examples at batch 64 is 15.6 steps per epoch: 2 epochs of warmup and a 2-epoch run are the same
  # number of steps, so the warmup ends exactly where the run would.
  train = ml_collections.ConfigDict(dict(batch_size=64, epochs=2.0, num_steps=-1))
  total = durations.total_steps(train, 1000)
  assert total == 32
  config = ml_collections.ConfigDict(dict(schedule='constant', base_learning_rate=0.1, reference_batch_size=64,
                                          warmup_epochs=2.0))
  with pytest.raises(ConfigError, match=r'warmup \(32 steps\) must be shorter than training \(32 steps\)'):
    optim.learning_rate_schedule(config, batch_size=64, examples_per_epoch=1000, total_steps=total)
  config.warmup_epochs = 1.0
  schedule = optim.learning_rate_schedule(config, batch_size=64, examples_per_epoch=1000, total_steps=total)
  assert float(schedule(15)) < 0.1 == pytest.approx(float(schedule(16)))
