"""Top-1/top-5 accuracy of one or more weight sets over a whole evaluation split, and of checkpoints."""
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from nfnets import checkpoint
from nfnets import distributed
from nfnets import models
from nfnets import pretrained
from nfnets import train_step
from nfnets.data import pipeline
from nfnets.data import sources


def evaluate(p_eval_step: Callable[..., Any], weight_sets: dict, batches: Iterable[dict]) -> dict[str, float]:
  """Runs a pmapped `train_step.make_eval_step` over every batch and turns hit counts into accuracies.

  Args:
    p_eval_step: the pmapped eval step.
    weight_sets: `{prefix: (params, model_state)}`, replicated over the local devices.
    batches: the eval iterator; padding examples carry mask 0 and are not counted.

  Returns:
    `{'{prefix}top1': .., '{prefix}top5': .., 'num_examples': ..}` over all hosts.
  """
  totals = None
  for batch in batches:
    sums = p_eval_step(weight_sets, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    raise ValueError('the evaluation split is empty')
  # psum made every device's copy the global (this host's) total; other hosts hold their own shard's.
  host_totals = {k: np.asarray(v[0], np.float64) for k, v in jax.device_get(totals).items()}
  if jax.process_count() > 1:
    host_totals = {k: float(np.sum(multihost_utils.process_allgather(v))) for k, v in host_totals.items()}
  count = float(host_totals.pop('count'))
  results = {name: float(hits) / count for name, hits in host_totals.items()}
  results['num_examples'] = count
  return results


def load_checkpoint_weights(path: str, model_config: ml_collections.ConfigDict
                            ) -> tuple[ml_collections.ConfigDict, dict]:
  """Reads any checkpoint the project knows into `(model_config, {prefix: (params, model_state)})`.

  A reference `F*_haiku.npz` file gives its variant and class count (read from the weights) on top of
  `model_config`; a project checkpoint brings its own model config.
  """
  if os.path.isfile(path):
    params, variant = pretrained.load_official_params(path)
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    model_config.update(name='nfnet', variant=variant, depths=None, widths=None,
                        num_classes=pretrained.num_classes_of(params))
    return model_config, {'': (params, {})}
  meta = checkpoint.read_meta(path)
  model_config = ml_collections.ConfigDict(meta['model'])
  forward = models.make_forward(model_config)
  res = 32  # parameter shapes do not depend on the image size
  like_params, like_state = jax.eval_shape(
      lambda: forward.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), is_training=True))
  weights, _ = checkpoint.load_weights(path, like_params, like_state)
  weight_sets = {'': (weights['params'], weights['model_state'])}
  if 'ema_params' in weights:
    weight_sets['ema_'] = (weights['ema_params'], weights['ema_model_state'])
  return model_config, weight_sets


def evaluate_checkpoint(config: ml_collections.ConfigDict, path: str) -> dict[str, float]:
  """Accuracy of every weight set in the checkpoint at `path` on `config.data`'s evaluation split."""
  model_config, weight_sets = load_checkpoint_weights(path, config.model)
  info = sources.dataset_info(config.data)
  if info.num_classes != model_config.num_classes:
    raise ValueError(f'the checkpoint predicts {model_config.num_classes} classes but dataset '
                     f'{config.data.name!r} has {info.num_classes}')
  forward = models.make_forward(model_config, config.precision.compute_dtype)
  p_eval_step = jax.pmap(train_step.make_eval_step(forward), axis_name=train_step.AXIS_NAME)
  batches = pipeline.make_eval_iterator(config.data, global_batch_size=config.train.eval_batch_size)
  return evaluate(p_eval_step, distributed.replicate(weight_sets, train_step.AXIS_NAME), batches)
