"""Evaluates a checkpoint: one written by training or `scripts.convert_checkpoint`, or a reference
`F*_haiku.npz` file, on the config's evaluation split at its evaluation resolution, in float32.

  python -m experiments.eval --checkpoint F0_haiku.npz --config configs/nfnet.py:F0 \
      --config.data.data_dir=~/tensorflow_datasets
  python -m experiments.eval --checkpoint runs/tiny-20261128-101500

Without --config a project checkpoint is evaluated with its run's own config and a reference file with its
variant's published recipe (test resolution); a --config that contradicts the checkpoint's model is refused.
Prints one JSON line of results.
"""
import json

from absl import app
from absl import flags

import configs
from nfnets import checkpoint
from nfnets import cli
from nfnets import distributed
from nfnets import evaluate

_CONFIG = cli.define_config_flag('Experiment config, as path:arg; default: the checkpoint\'s own.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'A checkpoint directory, a workdir, an F*_haiku.npz or a timm .safetensors.')
flags.mark_flag_as_required('checkpoint')
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.initialize_distributed(_CONFIG.value)
  cli.require_config_for_overrides()
  loaded = checkpoint.read(_CHECKPOINT.value)
  config = configs.for_checkpoint(loaded, _CONFIG.value if cli.config_given() else None)
  results = evaluate.evaluate_weights(config, loaded.model_config, loaded.weight_sets)
  if distributed.is_primary_host():
    print(json.dumps({'checkpoint': _CHECKPOINT.value, **results}))


if __name__ == '__main__':
  cli.run(main)
