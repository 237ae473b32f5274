"""Top-1/top-5 accuracy of one or more weight sets over a whole evaluation split, and of checkpoints."""
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from nfnets import checkpoint
from nfnets import distributed
from nfnets import models
from nfnets import train_step
from nfnets.data import pipeline
from nfnets.data import sources
from nfnets.errors import ConfigError
from nfnets.errors import DataNotFoundError


def evaluate(p_eval_step: Callable[..., Any], weight_sets: dict, batches: Iterable[dict]) -> dict[str, float]:
  """Runs a pmapped `train_step.make_eval_step` over every batch and turns hit counts into accuracies.

  Args:
    p_eval_step: the pmapped eval step.
    weight_sets: `{prefix: (params, model_state)}`, replicated over the local devices.
    batches: this host's eval iterator; padding examples carry mask 0 and are not counted.

  Returns:
    `{'{prefix}top1': .., '{prefix}top5': .., 'num_examples': ..}` over all hosts. Each host evaluates its own
    part of the split; the step's psum runs over every device of every host, so its result already is the
    global total and every example is counted exactly once.
  """
  totals = None
  for batch in batches:
    sums = p_eval_step(weight_sets, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    raise DataNotFoundError('the evaluation split is empty')
  totals = {k: float(np.asarray(v[0], np.float64)) for k, v in jax.device_get(totals).items()}
  count = totals.pop('count')
  results = {name: hits / count for name, hits in totals.items()}
  results['num_examples'] = count
  return results


def evaluate_weights(config: ml_collections.ConfigDict, model_config, weight_sets: dict) -> dict[str, float]:
  """Accuracy of `{prefix: (params, model_state)}` on `config.data`'s evaluation split, in the eval precision."""
  info = sources.dataset_info(config.data)
  if info.num_classes != model_config['num_classes']:
    raise ConfigError(f'the model predicts {model_config["num_classes"]} classes but dataset '
                      f'{config.data.name!r} has {info.num_classes}')
  forward = models.make_forward(model_config, config.precision.eval_compute_dtype)
  p_eval_step = jax.pmap(train_step.make_eval_step(forward), axis_name=distributed.AXIS_NAME)
  batches = pipeline.make_eval_iterator(config.data, global_batch_size=config.train.eval_batch_size)
  return evaluate(p_eval_step, distributed.replicate(weight_sets, distributed.AXIS_NAME), batches)


def evaluate_checkpoint(config: ml_collections.ConfigDict, path: str) -> dict[str, float]:
  """Accuracy of every weight set in the checkpoint at `path` on `config.data`'s evaluation split."""
  loaded = checkpoint.read(path)
  return evaluate_weights(config, loaded.model_config, loaded.weight_sets)
