"""Configs, one module per model family (`configs/<family>.py` with `get_config(arg)`), and the rules that pick a
config for a checkpoint."""
import copy
import importlib
from typing import Any, Mapping, Optional

import ml_collections

from configs import common
from nfnets import models
from nfnets.errors import ConfigError

# Config fields that were renamed: a command-line override of the old spelling is refused with a line naming the
# new one (nfnets.cli; nfnets.optim refuses the old field in a config built in Python), and `upgrade` rewrites it
# in a stored config.
RENAMED_FIELDS = {
    'optimizer.clipping': 'optimizer.agc_lambda (clip_mode agc) or optimizer.global_norm_threshold '
                          '(clip_mode global_norm)',
}


def upgrade(config: Mapping[str, Any]) -> dict[str, Any]:
  """A stored run config (a checkpoint's, a finished ablation run's) in today's field names.

  `optimizer.clipping` was AGC's lambda, or the global-norm threshold under clip_mode 'global_norm'; it becomes
  the field its clip_mode read. The other field did not exist then: the recipe's default stands in for it.
  """
  config = copy.deepcopy(dict(config))
  optimizer = config.get('optimizer')
  if isinstance(optimizer, Mapping) and 'clipping' in optimizer:
    optimizer = dict(optimizer)
    clipping = optimizer.pop('clipping')
    field = 'global_norm_threshold' if optimizer.get('clip_mode') == 'global_norm' else 'agc_lambda'
    optimizer = {**common.optimizer_config().to_dict(), **optimizer, field: clipping}
    config['optimizer'] = optimizer
  return config


def for_model(model_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The family's published recipe for the model a checkpoint holds, with that checkpoint's model section.

  Used to evaluate a reference checkpoint at its own variant's resolution when no --config is given.
  """
  module = importlib.import_module(f'configs.{model_config["name"]}')
  config = module.get_config(model_config['variant'])
  config.model = ml_collections.ConfigDict(dict(model_config))
  return config


def for_checkpoint(loaded, given: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """The config to evaluate or use checkpoint `loaded` (a `nfnets.checkpoint.Checkpoint`) with.

  `given`: the config the command line named (None when it named none). Its model must not contradict the
  checkpoint's (one line otherwise), and the checkpoint's model section is used. Without it: the run's own config
  for a project checkpoint, the family's published recipe for a reference file (so it is evaluated at its
  variant's test resolution).
  """
  if given is None:
    if loaded.config is not None:
      return ml_collections.ConfigDict(upgrade(loaded.config))
    return for_model(loaded.model_config)
  problem = models.contradiction(given.model.to_dict(), loaded.model_config)
  if problem:
    raise ConfigError(f'--config does not describe the model in {loaded.path} ({problem}); pass the matching '
                      'config, or none to use the checkpoint\'s own')
  config = ml_collections.ConfigDict(given.to_dict())
  config.model = ml_collections.ConfigDict(dict(loaded.model_config))
  return config
