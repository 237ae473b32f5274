"""Trains an NFNet; with no arguments, the `tiny` preset on the bundled digits dataset (a few CPU minutes).

  python -m experiments.train
  python -m experiments.train --config configs/nfnet.py:F0 --workdir DIR --config.optimizer.clipping=0.02

Rerunning with the same --workdir resumes from its latest checkpoint.
"""
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import common
from nfnets import distributed
from nfnets import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, f'Experiment config, as path:arg. Default: {common.DEFAULT_CONFIG}', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and logs; an existing run there is resumed. '
                               'Default: runs/<config arg>-<time> under the current directory.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      'runs', f'{common.config_name()}-{time.strftime("%Y%m%d-%H%M%S")}')
  with common.one_line_errors():
    distributed.initialize(config.distributed)
    trainer.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
