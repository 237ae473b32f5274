"""Pieces shared by every config: the recipe's defaults, grouped as the library reads them.

Each `*_config()` returns a fresh ConfigDict holding the paper's numbers; variant configs change only what
differs. Every value is typed by its default, so a command-line override of the wrong type fails loudly.
"""
import ml_collections

from nfnets import models
from nfnets.data import sources


def optimizer_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='sgd',                 # 'sgd' (the paper) | 'adamw' (fine-tuning)
      base_learning_rate=0.1,     # scaled by batch_size / reference_batch_size
      reference_batch_size=256,
      warmup_epochs=5.0,
      schedule='cosine',          # 'cosine' | 'constant'
      momentum=0.9,
      nesterov=True,
      weight_decay=2e-5,          # coupled; never on gains, biases or skip gains
      clip_mode='agc',            # 'agc' | 'global_norm' | 'none': which of the two fields below applies
      agc_lambda=0.01,            # clip_mode 'agc': the largest ratio ||G_i|| / max(||W_i||, agc_eps) per unit
      agc_eps=1e-3,
      global_norm_threshold=1.0,  # clip_mode 'global_norm': the largest global norm of the gradients
      sam_rho=0.0,                # > 0 turns on sharpness-aware minimisation (the F6 recipe)
      adam_b1=0.9,
      adam_b2=0.999,
      ema_decay=0.99999,
  ))


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='imagenet2012',        # a registered dataset (nfnets/data/sources.py) or 'tfds:NAME'
      data_dir=ml_collections.config_dict.placeholder(str),  # None: the dataset's default location
      train_split='train',
      eval_split='validation',
      train_resolution=192,
      eval_resolution=256,
      eval_resize_margin=32,
      crop_min_area=0.08,
      flip=True,
      randaugment_layers=4,
      randaugment_magnitude=5.0,
      randaugment_after_mix=True,
      randaugment_semantics='reference',  # 'reference' (the paper's TF ops) | 'corrected'
      mix='mixup_cutmix',         # 'mixup_cutmix' | 'none'
      mixup_alpha=0.2,
      num_workers=-1,             # input worker processes per training process; -1: from its usable cores,
                                  # 0: threads of the training process only (nfnets/data/workers.py)
      device_prefetch=2,          # training batches copied to the devices ahead of their step; 0: none
  ))


def train_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      batch_size=4096,            # global, across all hosts and devices
      epochs=360.0,
      num_steps=-1,               # > 0 overrides `epochs`
      eval_batch_size=1024,       # global
      log_every_steps=100,
      eval_every_steps=-1,        # <= 0: evaluate at the end only
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
      max_consecutive_nonfinite=10,  # skipped non-finite updates in a row that stop the run (not float16 overflows)
      accumulation_steps=1,       # k: each update averages k micro-batches of batch_size / (k x devices) per device
  ))


def base_config(model_name: str, variant: str) -> ml_collections.ConfigDict:
  """The recipe's defaults around the model family's own `config.model` for `variant`."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = models.model_config(model_name, variant)
  # A checkpoint (project or reference) to start from, for fine-tuning: its weights replace the fresh ones,
  # except the classifier when the class counts differ. Ignored when the workdir already holds a checkpoint.
  config.init_from = ml_collections.config_dict.placeholder(str)
  config.optimizer = optimizer_config()
  config.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1))
  config.data = data_config()
  config.train = train_config()
  # Training: bfloat16 activations and compute, float32 master weights, optimiser state and logits.
  # Evaluation runs in float32, as the reference evaluated. compute_dtype='float16' (GPUs without bfloat16)
  # trains with dynamic loss scaling, starting at `initial_loss_scale` and doubling it after
  # `loss_scale_period` updates without overflow (docs/accumulation_and_float16.md).
  config.precision = ml_collections.ConfigDict(dict(
      compute_dtype='bfloat16', eval_compute_dtype='float32',
      initial_loss_scale=2.0 ** 15, loss_scale_period=2000))
  # Multi-host runs: calls jax.distributed.initialize() before anything touches the devices (TPU pods find
  # their peers; elsewhere pass --coordinator_address, --num_processes and --process_id, or JAX's variables).
  config.distributed = False
  return config


def use_dataset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Points `config` at the registered dataset `name`: its class count, splits and the preprocessing that
  suits it (`Dataset.data_config`); returns it. Resolution, RandAugment and the rest of the recipe stay the
  caller's.
  """
  dataset = sources.get_dataset(name)
  config.model.num_classes = dataset.num_classes
  config.data.name = name
  config.data.update(dataset.data_config)
  return config


def digits_preset(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets `config` (any family's) to train on the bundled digits dataset in minutes on a CPU; returns it.

  The model stays the caller's to shrink (and to give 10 classes); so do the family's optimiser numbers.
  """
  use_dataset(config, 'digits')
  config.data.train_resolution = 32
  config.data.eval_resolution = 32
  config.data.eval_resize_margin = 0
  config.data.randaugment_layers = 1
  config.data.randaugment_magnitude = 3.0
  config.data.num_workers = 0

  config.train.batch_size = 64
  config.train.eval_batch_size = 128
  config.train.epochs = 20.0
  config.train.log_every_steps = 20
  config.train.checkpoint_every_steps = 200
  config.optimizer.warmup_epochs = 1.0
  config.optimizer.ema_decay = 0.999
  # XLA's CPU backend is no faster in bfloat16; keep float32 there.
  config.precision.compute_dtype = 'float32'
  return config
