"""Evaluates a checkpoint: one written by training or `scripts.convert_checkpoint`, or a reference
`F*_haiku.npz` file, on the config's evaluation split at its evaluation resolution.

  python -m experiments.eval --config configs/nfnet.py:F0 --checkpoint /path/to/F0_haiku.npz \
      --config.data.data_dir=~/tensorflow_datasets
  python -m experiments.eval --config configs/nfnet.py:tiny --checkpoint runs/tiny-20261128-101500

A project checkpoint carries its own model config, which wins over --config's `model`; the data settings
come from --config. Prints one JSON line of results.
"""
import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import common
from nfnets import distributed
from nfnets import evaluate

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, f'Experiment config, as path:arg. Default: {common.DEFAULT_CONFIG}', lock_config=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A checkpoint directory, a workdir, or an F*_haiku.npz.')
flags.mark_flag_as_required('checkpoint')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  with common.one_line_errors():
    distributed.initialize(config.distributed)
    results = evaluate.evaluate_checkpoint(config, _CHECKPOINT.value)
  if distributed.is_primary_host():
    print(json.dumps({'checkpoint': _CHECKPOINT.value, **results}))


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
