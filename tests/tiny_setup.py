"""The small training set-up that the train-step and trainer tests share.

Both build their step from this one config, so the compiled train step (the suite's costliest
compilation on CPU) is found in the persistent compilation cache by whichever test comes second.
"""
import os

import ml_collections

from configs import nfnet as nfnet_configs
from tests import helpers

NUM_STEPS = 30
BATCH_SIZE = 32          # 16 per simulated device
EVAL_BATCH_SIZE = 64     # the 360 test digits end in a padded batch
DIGITS_TRAIN_EXAMPLES = 1437
DIGITS_TEST_EXAMPLES = 360
RESOLUTION = 32
NUM_CLASSES = 10


def tiny_config(num_steps: int = NUM_STEPS) -> ml_collections.ConfigDict:
  config = nfnet_configs.get_config('tiny')
  # Dropout and stochastic depth draw per-device keys; off, one device and two must agree exactly.
  config.model.drop_rate = 0.0
  config.model.stochdepth_rate = 0.0
  config.train.num_steps = num_steps
  config.train.batch_size = BATCH_SIZE
  config.train.eval_batch_size = EVAL_BATCH_SIZE
  config.train.log_every_steps = 5
  config.train.checkpoint_every_steps = 10
  config.optimizer.warmup_epochs = 0.05
  config.optimizer.base_learning_rate = 2.0  # 0.25 at batch 32: visible progress within 30 steps
  return config


def command_line_overrides(num_steps: int = NUM_STEPS) -> list[str]:
  """`tiny_config(num_steps)` as `experiments.train` flags, for tests that run the command itself."""
  config_file = os.path.join(helpers.REPO_ROOT, 'configs', 'nfnet.py')
  return ['--config', f'{config_file}:tiny',
          '--config.model.drop_rate=0.0', '--config.model.stochdepth_rate=0.0',
          f'--config.train.num_steps={num_steps}', f'--config.train.batch_size={BATCH_SIZE}',
          f'--config.train.eval_batch_size={EVAL_BATCH_SIZE}', '--config.train.log_every_steps=5',
          '--config.train.checkpoint_every_steps=10', '--config.optimizer.warmup_epochs=0.05',
          '--config.optimizer.base_learning_rate=2.0']
