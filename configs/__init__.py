"""Configs, one module per model family (`configs/<family>.py` with `get_config(arg)`)."""
import importlib
from typing import Any, Mapping

import ml_collections


def for_model(model_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The family's published recipe for the model a checkpoint holds, with that checkpoint's model section.

  Used to evaluate a reference checkpoint at its own variant's resolution when no --config is given.
  """
  module = importlib.import_module(f'configs.{model_config["name"]}')
  config = module.get_config(model_config['variant'])
  config.model = ml_collections.ConfigDict(dict(model_config))
  return config
