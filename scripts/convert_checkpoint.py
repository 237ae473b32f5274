"""Converts published weights into the project's checkpoint format, and NFNets out to timm.

  python -m scripts.convert_checkpoint F0_haiku.npz checkpoints/F0
  python -m scripts.convert_checkpoint --from timm model.safetensors checkpoints/F0
  python -m scripts.convert_checkpoint --to timm checkpoints/F0 dm_nfnet_f0.safetensors

In: a reference pickle (F*_haiku.npz), read with the restricted unpickler of `nfnets.pretrained` (it builds
nothing but containers and arrays), or a timm NFNet state dict (`--from timm`, a .safetensors file; see
`nfnets.timm_weights` and docs/timm_weights.md). The output is a weights-only orbax checkpoint (local or gs://)
that `experiments.eval --checkpoint` reads and fine-tuning starts from; it records the model config, and the
variant's published recipe as its config (or --config's, which must describe the same model).

Out (`--to timm`): any checkpoint `nfnets.checkpoint.read` accepts (its EMA weights when it has them) as a
timm `NormFreeNet` state dict in a .safetensors file; the line that builds the matching PyTorch model is
printed. An existing output is refused, and nothing is written when the input is wrong.
"""
import json

from absl import flags

import configs
from nfnets import checkpoint
from nfnets import cli
from nfnets import timm_weights
from nfnets.errors import UserError

_CONFIG = cli.define_config_flag('Config to record with the weights; default: the variant\'s recipe.')
_FROM = flags.DEFINE_enum('from', None, checkpoint.FILE_KINDS,
                          'Format of SOURCE; default: timm for a .safetensors file, else reference.')
_TO = flags.DEFINE_enum('to', None, ['timm'], 'Export a checkpoint to this format instead of importing one.')

USAGE = ('usage: python -m scripts.convert_checkpoint [--from reference|timm] SOURCE DESTINATION, or '
         '--to timm CHECKPOINT OUT.safetensors')


def convert(source: str, destination: str, config=None, file_format=None) -> dict:
  """Writes the converted checkpoint and returns its model config; `config` None: the variant's recipe."""
  loaded = checkpoint.read(source, file_format)
  if loaded.kind == 'project':
    raise UserError(f'{source} is already a project checkpoint')
  config = configs.for_checkpoint(loaded, config)
  params, model_state = loaded.weight_sets['']
  checkpoint.save_weights(destination, params, model_state,
                          meta={'model': loaded.model_config, 'config': json.loads(config.to_json()),
                                'source': str(source)})
  return loaded.model_config


def export_timm(source: str, destination: str) -> tuple[str, str]:
  """Writes `source`'s NFNet as a timm state dict; returns (weight set used, PyTorch line that builds it)."""
  if not destination.endswith('.safetensors'):
    raise UserError(f'{destination}: the timm export is a .safetensors file; name it so')
  loaded = checkpoint.read(source)
  prefix = 'ema_' if 'ema_' in loaded.weight_sets else ''
  params, _ = loaded.weight_sets[prefix]
  timm_weights.save(destination, params, loaded.model_config)
  return ('EMA' if prefix else 'raw'), timm_weights.timm_model_line(loaded.model_config)


def main(argv):
  if len(argv) != 3:
    raise UserError(USAGE)
  if _TO.value is not None:
    if _FROM.value is not None:
      raise UserError('--from and --to exclude each other: --to exports a checkpoint, --from imports one')
    weights, line = export_timm(argv[1], argv[2])
    print(f'exported the {weights} weights of {argv[1]} to {argv[2]}; in PyTorch: model = {line}; '
          f'model.load_state_dict(safetensors.torch.load_file({argv[2]!r}), strict=True)')
    return
  cli.require_config_for_overrides()
  model_config = convert(argv[1], argv[2], _CONFIG.value if cli.config_given() else None, _FROM.value)
  print(f'converted {argv[1]} ({model_config["name"]} {model_config["variant"]}) to {argv[2]}')


if __name__ == '__main__':
  cli.run(main)
