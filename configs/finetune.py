"""Fine-tuning configs: start from pretrained weights, a new classifier for the new task, a short low-lr run.

  # NFNet-F0 from the published weights onto the bundled digits (the 1000-way classifier becomes 10-way)
  python -m experiments.train --config configs/finetune.py:F0 --config.init_from=F0_haiku.npz

  # a linear probe: only the classifier trains, every other weight stays bitwise as loaded; AdamW
  python -m experiments.train --config configs/finetune.py:F0 --config.init_from=F0_haiku.npz \
      --config.finetune.freeze_backbone=True --config.optimizer.name=adamw \
      --config.optimizer.base_learning_rate=0.001

  # any TFDS image-classification dataset prepared as array_record; the class count must match it
  python -m experiments.train --config configs/finetune.py:F0 --config.init_from=checkpoints/F0 \
      --config.data.name=tfds:oxford_flowers102 --config.data.data_dir=~/tensorflow_datasets \
      --config.data.eval_split=test --config.model.num_classes=102 --config.data.flip=True

  # the tiny NFNet on a CPU, from any run of `python -m experiments.train` (configs/nfnet.py:tiny)
  python -m experiments.train --config configs/finetune.py:tiny --config.init_from=runs/tiny-20261128-101500

Arguments: `F0` ... `F7`, `F0+` ... `F7+` (the variant's architecture and resolutions from configs/nfnet.py),
`tiny` (the CPU preset's architecture). `config.init_from` takes a reference `F*_haiku.npz`, a converted
checkpoint or a training workdir; its EMA weights are used when it has them, and the classifier is
re-initialised when its class count differs from `model.num_classes` (otherwise it is kept). Without
`init_from` the same recipe trains from scratch.

What differs from pre-training: the bundled digits as the default data (no flips: a mirrored digit is
another symbol), no MixUp/CutMix and no RandAugment, a ten times lower learning rate, a few epochs, no weight
decay (the weights start where they should be, not at zero), a faster EMA.
"""
import ml_collections

from configs import common
from configs import nfnet as nfnet_configs

# Relative to the pre-training recipe's base learning rate (per 256 examples).
LEARNING_RATE_FACTOR = 0.1


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  config = nfnet_configs.get_config(arg)
  config.finetune = ml_collections.ConfigDict(dict(
      # Train the classifier (the family's `classifier_module`) alone; every other weight, and its EMA,
      # stays bitwise as loaded.
      freeze_backbone=False,
  ))
  common.use_dataset(config, 'digits')
  config.data.randaugment_layers = 0

  config.optimizer.base_learning_rate *= LEARNING_RATE_FACTOR
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_epochs = 0.5
  config.optimizer.sam_rho = 0.0
  config.optimizer.ema_decay = 0.999

  config.train.epochs = 5.0
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 100
  config.train.batch_size = 64 if arg == 'tiny' else 128
  config.train.eval_batch_size = 128
  return config
