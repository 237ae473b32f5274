"""Checks the model-family tests share: signal propagation at init, a short run's config, one pmapped step."""
import jax
import numpy as np
import pytest

from nfnets import distributed
from nfnets import models
from nfnets import train_state
from nfnets import trainer
from tests import helpers
from tests import reference_forward
from tests import tiny_setup


def check_signal_propagation(model_config, alpha: float, num_images: int = 32):
  """At init-like weights the residual stream's variance grows by alpha^2 x the branch's variance per block
  inside a stage, and stays flat while the skip gains are 0 (their init value)."""
  forward = models.make_forward(model_config, return_metrics=True)
  images = np.random.default_rng(0).normal(size=(num_images, 32, 32, 3)).astype(np.float32)
  params, _ = jax.eval_shape(lambda x: forward.init(jax.random.PRNGKey(0), x, is_training=False), images)
  shapes = helpers.module_shapes(params)
  # Kernels random (weight standardisation makes their scale irrelevant); gains, biases as initialised.
  params = {m: {n: (np.ones_like(a) if n in ('gain', 'skip_gain') else np.zeros_like(a) if n in ('bias', 'b')
                    else a) for n, a in p.items()}
            for m, p in reference_forward.random_params(shapes, seed=1).items()}
  apply = jax.jit(lambda p, x: forward.apply(p, {}, None, x, is_training=False)[0]['signal_propagation'])
  stats = apply(params, images)
  names = list(stats)
  assert len(names) == sum(model_config['depths'])
  stage_starts = set(np.cumsum((0,) + tuple(model_config['depths'][:-1])))
  within = [i for i in range(1, len(names)) if i not in stage_starts]
  get = lambda key: np.array([float(stats[n][key]) for n in names])
  avg_var, res_var = get('avg_var'), get('res_avg_var')
  assert np.all(res_var > 0) and within
  for i in within:
    assert avg_var[i] - avg_var[i - 1] == pytest.approx(alpha**2 * res_var[i], rel=0.5)

  skip_zero = {m: ({'skip_gain': np.zeros((), np.float32)} if 'skip_gain' in p else p) for m, p in params.items()}
  flat = apply(skip_zero, images)
  for i in within:
    assert float(flat[names[i]]['avg_var']) == pytest.approx(float(flat[names[i - 1]]['avg_var']), rel=1e-5)


def random_batch(num_devices: int = 2, per_device: int = tiny_setup.BATCH_SIZE // 2, seed: int = 0):
  """A digits-shaped batch, laid out as the trainer feeds the pmapped step."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num_devices, per_device, 32, 32, 3), dtype=np.uint8)  # pixels
  labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, (num_devices, per_device))]
  return {'images': images, 'labels': labels}


def short_run(config, num_steps: int = 6):
  """`config` (a family's `tiny` digits preset) cut to a few steps of batch 32 without warmup; returns it.

  Tests that run the step directly and through the trainer with the same config share its compilation.
  """
  config.train.num_steps = num_steps
  config.train.batch_size = tiny_setup.BATCH_SIZE
  config.train.eval_batch_size = tiny_setup.EVAL_BATCH_SIZE
  config.train.log_every_steps = num_steps // 2
  config.train.checkpoint_every_steps = num_steps // 2
  config.optimizer.warmup_epochs = 0.0
  return config


class PmappedStep:
  """The trainer's own train step for `config` (as `short_run` makes it), pmapped over the 2 devices once."""

  def __init__(self, config):
    self.config = config
    self.setup = trainer.setup_training(config, tiny_setup.DIGITS_TRAIN_EXAMPLES)
    self.initial_state = train_state.fresh_train_state(self.setup.forward, self.setup.optimizer, config.seed,
                                                       config.data.train_resolution)
    self._step = jax.pmap(self.setup.train_step, axis_name=distributed.AXIS_NAME)

  def run(self, batches):
    """[(state, metrics) after each batch], from the initial state; checks both devices agree each time."""
    replicated = distributed.replicate(self.initial_state, distributed.AXIS_NAME)
    history = []
    for batch in batches:
      replicated, metrics = self._step(replicated, batch)
      for leaf in jax.tree.leaves(replicated):
        np.testing.assert_array_equal(leaf[0], leaf[1])
      history.append((distributed.unreplicate(replicated), {k: float(v[0]) for k, v in metrics.items()}))
    return history
