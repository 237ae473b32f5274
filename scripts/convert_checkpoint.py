"""Converts a reference checkpoint (F*_haiku.npz, a pickle) into the project's checkpoint format.

  python -m scripts.convert_checkpoint F0_haiku.npz checkpoints/F0

The pickle is read with the restricted unpickler of `nfnets.pretrained` (it builds nothing but containers
and arrays). The output is a weights-only orbax checkpoint (local or gs://) that `experiments.eval
--checkpoint` reads and fine-tuning starts from; it records the model config, and the variant's published
recipe as its config (or --config's, which must describe the same model). An existing OUT is refused.
"""
import json

from absl import flags

from experiments import common
from nfnets import checkpoint
from nfnets.errors import UserError

_CONFIG = common.define_config_flag('Config to record with the weights; default: the variant\'s recipe.')


def convert(source: str, destination: str, config=None) -> dict:
  """Writes the converted checkpoint and returns its model config."""
  loaded = checkpoint.read(source)
  if loaded.kind != 'reference':
    raise UserError(f'{source} is already a project checkpoint')
  config = common.config_for_checkpoint(config, loaded)
  params, model_state = loaded.weight_sets['']
  checkpoint.save_weights(destination, params, model_state,
                          meta={'model': loaded.model_config, 'config': json.loads(config.to_json()),
                                'source': str(source)})
  return loaded.model_config


def main(argv):
  if len(argv) != 3:
    raise UserError('usage: python -m scripts.convert_checkpoint SOURCE.npz DESTINATION')
  model_config = convert(argv[1], argv[2], _CONFIG.value)
  print(f'converted {argv[1]} ({model_config["name"]} {model_config["variant"]}) to {argv[2]}')


if __name__ == '__main__':
  common.run(main)
