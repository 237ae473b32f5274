"""Configs of the batch-normalised baseline: SE-ResNeXt-D with NFNet-F0..F7's (and F0+..F7+'s) architecture.

  python -m experiments.train --config configs/se_resnext.py:tiny --workdir /tmp/se_resnext_tiny
  python -m experiments.train --config configs/se_resnext.py:F0 --workdir gs://bucket/bn_f0 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets --config.distributed=True

Arguments: `F0` ... `F7`, `F0+` ... `F7+`, `tiny`.

The recipe is NFNet's for the same variant (`configs/nfnet.py`: batch, epochs, resolutions, RandAugment,
MixUp/CutMix, dropout, stochastic depth, optimiser, EMA, bfloat16), so that the two configs differ only in
what the comparison is about: the model (batch normalisation instead of scaled weight standardisation and
signal bookkeeping) and its optimiser's one BN-specific change, no gradient clipping (batch-normalised
networks train without it; AGC is the NF networks' substitute). BN itself follows the usual ResNet practice:
statistics over the global batch (cross-replica), moving averages with decay 0.9, eps 1e-5, scale 1 and
offset 0 at init, no weight decay on them.

NF against BN at batch size B is the same command with a different config file:

  python -m experiments.train --config configs/nfnet.py:F0 --config.train.batch_size=B --workdir runs/nf_B
  python -m experiments.train --config configs/se_resnext.py:F0 --config.train.batch_size=B --workdir runs/bn_B

(the learning rate follows the batch size: base_learning_rate × B / 256).
"""
import ml_collections

from configs import common
from configs import nfnet as nfnet_configs
from nfnets import models
from nfnets.models import se_resnext


def variant_config(variant: str) -> ml_collections.ConfigDict:
  """NFNet `variant`'s recipe around the batch-normalised model (see the module docstring)."""
  config = nfnet_configs.get_config(variant)
  drop_rate = config.model.drop_rate
  config.model = models.model_config('se_resnext', variant, drop_rate=drop_rate)
  config.optimizer.clip_mode = 'none'
  return config


def tiny_config() -> ml_collections.ConfigDict:
  """A narrow, shallow baseline on the bundled digits dataset: minutes on a 2-core CPU."""
  config = common.digits_preset(common.base_config('se_resnext', 'F0'))
  config.model.depths = (1, 1, 1, 1)
  config.model.widths = (32, 64, 96, 128)
  config.model.drop_rate = 0.1
  config.model.stochdepth_rate = 0.1
  config.optimizer.base_learning_rate = 0.4
  config.optimizer.clip_mode = 'none'
  return config


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  if arg == 'tiny':
    return tiny_config()
  if arg not in se_resnext.VARIANTS:
    raise ValueError(f'unknown SE-ResNeXt-D variant {arg!r}; known: {", ".join(se_resnext.VARIANTS)}, tiny')
  return variant_config(arg)
