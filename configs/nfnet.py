"""NFNet configs: the paper's ImageNet recipe for F0-F7 (and wide F0+-F7+), and a CPU preset.

  # The README's first command: a small NFNet on the bundled digits dataset, a few minutes on a laptop CPU.
  python -m experiments.train --config configs/nfnet.py:tiny --workdir /tmp/nfnet_tiny

  # The paper's F0 on ImageNet (TPU pod; every host runs the same command).
  python -m experiments.train --config configs/nfnet.py:F0 --workdir gs://bucket/f0 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets --config.distributed=True

Any value can be overridden, e.g. `--config.optimizer.clipping=0.02 --config.train.batch_size=1024`.
The variant table (depths, resolutions, RandAugment magnitude, dropout) lives in `nfnets.nfnet.VARIANTS`;
this file reads it rather than restating it.
"""
import ml_collections

from configs import common
from nfnets import nfnet

# The published F6 result used sharpness-aware minimisation.
_SAM_VARIANTS = {'F6': 0.05}


def _variant_config(variant: str) -> ml_collections.ConfigDict:
  if variant not in nfnet.VARIANTS:
    raise ValueError(f'unknown NFNet variant {variant!r}; known: {", ".join(sorted(nfnet.VARIANTS))}, tiny')
  table = nfnet.VARIANTS[variant]
  config = common.base_config(variant)
  config.model.drop_rate = table['drop_rate']
  config.data.train_resolution = table['train_imsize']
  config.data.eval_resolution = table['test_imsize']
  config.data.randaugment_magnitude = float(table['randaugment_magnitude'])
  config.optimizer.sam_rho = _SAM_VARIANTS.get(variant.rstrip('+'), 0.0)
  return config


def _tiny_config() -> ml_collections.ConfigDict:
  """A narrow, shallow NFNet on the bundled digits dataset: minutes on a 2-core CPU."""
  config = common.base_config('F0')
  config.model.num_classes = 10
  config.model.depths = (1, 1, 1, 1)
  config.model.widths = (32, 64, 96, 128)
  config.model.drop_rate = 0.1
  config.model.stochdepth_rate = 0.1

  config.data.name = 'digits'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.train_resolution = 32
  config.data.eval_resolution = 32
  config.data.eval_resize_margin = 0
  config.data.crop_min_area = 0.6
  config.data.flip = False           # a mirrored digit is a different symbol
  config.data.randaugment_layers = 1
  config.data.randaugment_magnitude = 3.0
  config.data.mix = 'none'
  config.data.num_workers = 0

  config.train.batch_size = 64
  config.train.eval_batch_size = 128
  config.train.epochs = 20.0
  config.train.log_every_steps = 20
  config.train.checkpoint_every_steps = 200
  config.optimizer.warmup_epochs = 1.0
  config.optimizer.base_learning_rate = 0.4
  config.optimizer.clipping = 0.04   # small batches tolerate a larger AGC lambda (paper, Fig. 3)
  config.optimizer.ema_decay = 0.999
  # XLA's CPU backend is no faster in bfloat16; keep float32 there.
  config.precision.compute_dtype = 'float32'
  return config


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  if arg == 'tiny':
    return _tiny_config()
  return _variant_config(arg)
