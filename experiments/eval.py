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

from experiments import common
from nfnets import checkpoint
from nfnets import distributed
from nfnets import evaluate

_CONFIG = common.define_config_flag('Experiment config, as path:arg; default: the checkpoint\'s own.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'A checkpoint directory, a workdir, an F*_haiku.npz or a timm .safetensors.')
flags.mark_flag_as_required('checkpoint')
common.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  common.initialize_distributed(_CONFIG.value)
  common.require_config_for_overrides()
  loaded = checkpoint.read(_CHECKPOINT.value)
  config = common.config_for_checkpoint(_CONFIG.value, loaded)
  results = evaluate.evaluate_weights(config, loaded.model_config, loaded.weight_sets)
  if distributed.is_primary_host():
    print(json.dumps({'checkpoint': _CHECKPOINT.value, **results}))


if __name__ == '__main__':
  common.run(main)
