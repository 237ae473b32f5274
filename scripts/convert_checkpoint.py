"""Converts a reference NFNet checkpoint (F*_haiku.npz, a pickle) into the project's checkpoint format.

  python -m scripts.convert_checkpoint F0_haiku.npz checkpoints/F0

The pickle is read with the restricted unpickler of `nfnets.pretrained` (it builds nothing but containers
and arrays). The output is a weights-only orbax checkpoint that `experiments.eval --checkpoint` reads and
fine-tuning starts from; it records the variant, so no pickle is needed again. An existing OUT is refused.
"""
import argparse
import sys

from configs import nfnet as nfnet_configs
from experiments import common
from nfnets import checkpoint
from nfnets import pretrained


def convert(source: str, destination: str) -> str:
  """Writes the converted checkpoint and returns the variant it holds."""
  params, variant = pretrained.load_official_params(source)
  model_config = nfnet_configs.get_config(variant).model
  model_config.num_classes = pretrained.num_classes_of(params)
  checkpoint.save_weights(destination, params, {}, meta={'model': model_config.to_dict(), 'source': source})
  return variant


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('source', help='reference checkpoint, e.g. F0_haiku.npz')
  parser.add_argument('destination', help='new directory for the project checkpoint')
  args = parser.parse_args(argv)
  try:
    variant = convert(args.source, args.destination)
  except common.USER_ERRORS as e:
    common.report_error(e)
    return 1
  print(f'converted {args.source} (NFNet-{variant}) to {args.destination}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
