"""NFNet configs: the paper's ImageNet recipe for F0-F7 (and wide F0+-F7+), the SAM rows, and a CPU preset.

  # The README's first command: a small NFNet on the bundled digits dataset, a few minutes on a laptop CPU.
  python -m experiments.train --config configs/nfnet.py:tiny --workdir /tmp/nfnet_tiny

  # The paper's F0 on ImageNet (TPU pod; every host runs the same command).
  python -m experiments.train --config configs/nfnet.py:F0 --workdir gs://bucket/f0 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets --config.distributed=True

Any value can be overridden, e.g. `--config.optimizer.agc_lambda=0.02 --config.train.batch_size=1024`.
Arguments: `F0` ... `F7`, `F0+` ... `F7+`, `F5-sam`, `F6` (trained with SAM, as published), `tiny`.
The architecture (depths, widths) is the model's (`nfnets.models.nfnet.VARIANTS`); the recipe numbers per
variant are here.
"""
from typing import Any, Optional

import ml_collections

from configs import common
from nfnets import models

# The paper's per-variant recipe: train / test resolution, RandAugment magnitude, head dropout.
RECIPES = {
    'F0': dict(train_resolution=192, eval_resolution=256, randaugment_magnitude=5.0, drop_rate=0.2),
    'F1': dict(train_resolution=224, eval_resolution=320, randaugment_magnitude=10.0, drop_rate=0.3),
    'F2': dict(train_resolution=256, eval_resolution=352, randaugment_magnitude=10.0, drop_rate=0.4),
    'F3': dict(train_resolution=320, eval_resolution=416, randaugment_magnitude=15.0, drop_rate=0.4),
    'F4': dict(train_resolution=384, eval_resolution=512, randaugment_magnitude=15.0, drop_rate=0.5),
    'F5': dict(train_resolution=416, eval_resolution=544, randaugment_magnitude=15.0, drop_rate=0.5),
    'F6': dict(train_resolution=448, eval_resolution=576, randaugment_magnitude=15.0, drop_rate=0.5),
    'F7': dict(train_resolution=480, eval_resolution=608, randaugment_magnitude=15.0, drop_rate=0.5),
}
SAM_RHO = 0.05

# The paper's published results (Table 3 and the reference release), kept here only: parameters
# (millions, every weight, the 1000-way classifier included), MACs at the test resolution (billions, SE and
# classifier included), ImageNet validation top-1 / top-5 (%). Keys are this file's config arguments: 'F6' was
# trained with SAM; 'F5-sam' is F5 trained with SAM (its top-5 was not published); F7 was not trained. None:
# not published. `python -m scripts.reproduce_table` prints them beside our measurements.
PUBLISHED = {
    'F0': dict(params_millions=71.49, macs_billions=12.38, top1=83.6, top5=96.8),
    'F1': dict(params_millions=132.63, macs_billions=35.54, top1=84.7, top5=97.1),
    'F2': dict(params_millions=193.78, macs_billions=62.59, top1=85.1, top5=97.3),
    'F3': dict(params_millions=254.92, macs_billions=114.76, top1=85.7, top5=97.5),
    'F4': dict(params_millions=316.07, macs_billions=215.24, top1=85.9, top5=97.6),
    'F5': dict(params_millions=377.21, macs_billions=289.76, top1=86.0, top5=97.6),
    'F5-sam': dict(params_millions=377.21, macs_billions=289.76, top1=86.3, top5=None),
    'F6': dict(params_millions=438.36, macs_billions=377.28, top1=86.5, top5=97.9),
    'F7': dict(params_millions=499.50, macs_billions=None, top1=None, top5=None),
}
# Published rows trained with sharpness-aware minimisation: F6 was only published with SAM; F5 both ways.
_SAM_BY_DEFAULT = ('F6',)


def published_row(model_config: dict[str, Any], run_config: Optional[dict[str, Any]]) -> tuple[Optional[str], str]:
  """The published row a checkpoint's model belongs to (None if none), and why not.

  The model must be the variant's published architecture (training-only entries such as dropout may differ);
  a project checkpoint whose run used SAM belongs to the '-sam' row (the published F6 is the SAM one).
  """
  name, variant = model_config.get('name'), model_config.get('variant')
  if name != 'nfnet' or variant not in models.get_family('nfnet').variants:
    return None, f'{name} {variant} is not a published model'
  problem = models.contradiction(dict(model_config), models.model_config('nfnet', variant).to_dict())
  if problem:  # e.g. a narrower preset, another class count or activation
    return None, f'not the published {variant} ({problem})'
  sam = bool(run_config and run_config.get('optimizer', {}).get('sam_rho', 0) > 0)
  row = f'{variant}-sam' if sam and variant != 'F6' else variant
  if row not in PUBLISHED:
    return None, f'no published row {row}'
  return row, ''


def variant_config(variant: str, sam: bool = False) -> ml_collections.ConfigDict:
  """The paper's ImageNet recipe for NFNet `variant` ('F0'..'F7', wide 'F0+'..'F7+')."""
  config = common.base_config('nfnet', variant)
  recipe = RECIPES[variant.rstrip('+')]
  config.model.drop_rate = recipe['drop_rate']
  config.data.train_resolution = recipe['train_resolution']
  config.data.eval_resolution = recipe['eval_resolution']
  config.data.randaugment_magnitude = recipe['randaugment_magnitude']
  config.optimizer.sam_rho = SAM_RHO if sam or variant.rstrip('+') in _SAM_BY_DEFAULT else 0.0
  return config


def tiny_config() -> ml_collections.ConfigDict:
  """A narrow, shallow NFNet on the bundled digits dataset: minutes on a 2-core CPU."""
  config = common.digits_preset(common.base_config('nfnet', 'F0'))
  config.model.depths = (1, 1, 1, 1)
  config.model.widths = (32, 64, 96, 128)
  config.model.drop_rate = 0.1
  config.model.stochdepth_rate = 0.1
  config.optimizer.base_learning_rate = 0.4
  config.optimizer.agc_lambda = 0.04   # small batches tolerate a larger AGC lambda (paper, Fig. 3)
  return config


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  if arg == 'tiny':
    return tiny_config()
  variant, sam = (arg[:-len('-sam')], True) if arg.endswith('-sam') else (arg, False)
  if variant.rstrip('+') not in RECIPES or variant.count('+') > 1:
    raise ValueError(f'unknown NFNet variant {arg!r}; known: {", ".join(RECIPES)}, their wide "+" variants, '
                     '"-sam" variants (e.g. F5-sam), tiny')
  return variant_config(variant, sam)
