"""Rematerialisation (`config.model.remat`): the same function and gradients, for every registered family."""
import importlib
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import distributed
from nfnets import models
from nfnets.models import layers
from tests.helpers import REPO_ROOT

FAMILIES = models.family_names()
RESOLUTION = 32
PER_DEVICE = 2


def _model_config(family: str, remat: bool):
  config = importlib.import_module(f'configs.{family}').get_config('tiny').model
  # Stochastic depth and dropout on, so that the rematerialised blocks must replay the same random draws.
  config.stochdepth_rate = 0.5
  config.drop_rate = 0.2
  config.remat = remat
  return config


def _loss_and_grads(family: str, remat: bool):
  """Loss, gradients and new model state of a training forward pass, pmapped over the (two) test devices so
  that the batch-normalised baseline averages its statistics across devices inside the rematerialised blocks."""
  forward = models.make_forward(_model_config(family, remat))
  devices = jax.local_devices()
  images = jax.random.normal(jax.random.PRNGKey(1), (len(devices), PER_DEVICE, RESOLUTION, RESOLUTION, 3))
  params, state = forward.init(jax.random.PRNGKey(0), images[0], is_training=True)
  # Off the initialisation (zero skip gains, zero classifier) so that every block's weights get a gradient.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  def loss_fn(params, state, rng, x):
    logits, new_state = forward.apply(params, state, rng, x, is_training=True)
    return jnp.mean(jnp.square(logits)), new_state

  def step(params, state, x):
    rng = jax.random.fold_in(jax.random.PRNGKey(3), jax.lax.axis_index(distributed.AXIS_NAME))
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, rng, x)
    return loss, grads, new_state

  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * len(devices)), tree)
  pmapped = jax.pmap(step, axis_name=distributed.AXIS_NAME)
  return jax.device_get(pmapped(replicate(params), replicate(state), images))


class _RandomStatefulBlock(hk.Module):
  """A residual block that uses all that `hk.remat` must thread through the recomputation: parameters, Haiku
  state (a running mean, as batch normalisation keeps) and an RNG key (a random mask, as stochastic depth draws)."""

  def __call__(self, x, is_training):
    residual = jax.nn.gelu(hk.Linear(x.shape[-1])(x))
    mean = hk.get_state('mean', residual.shape[-1:], init=jnp.zeros)
    hk.set_state('mean', 0.9 * mean + 0.1 * jnp.mean(residual, axis=0))
    keep = jax.random.bernoulli(hk.next_rng_key(), 0.7, residual.shape[:1])[:, None]
    return x + jnp.where(keep, residual - mean, 0.0), residual


def test_rematerialised_blocks_give_the_same_output_gradients_and_state(monkeypatch):
  """The mechanism every family uses (`layers.run_blocks`), on small blocks: the slow test below checks each
  family's own model."""
  consulted = []
  monkeypatch.setattr(layers, 'REMAT_POLICY', lambda *unused, **unused_kw: consulted.append(True) or False)

  def results(remat):
    def forward(x):
      blocks = [_RandomStatefulBlock(name=f'block{i}') for i in range(3)]
      out, _ = layers.run_blocks(blocks, x, is_training=True, return_metrics=False, remat=remat)
      return jnp.sum(jnp.sin(out))
    model = hk.transform_with_state(forward)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
    params, state = model.init(jax.random.PRNGKey(1), x)
    loss_fn = lambda p: model.apply(p, state, jax.random.PRNGKey(2), x)
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.device_get((loss, grads, new_state))

  loss, grads, state = results(remat=False)
  assert not consulted
  remat_loss, remat_grads, remat_state = results(remat=True)
  assert consulted
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), (remat_grads, remat_state),
               (grads, state))
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads))


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES)
def test_remat_gives_the_same_loss_gradients_and_state(family, monkeypatch):
  consulted = []

  def save_nothing(*unused_args, **unused_kwargs):  # what REMAT_POLICY = None means, but visible
    consulted.append(True)
    return False

  monkeypatch.setattr(layers, 'REMAT_POLICY', save_nothing)
  loss, grads, state = _loss_and_grads(family, remat=False)
  assert not consulted
  remat_loss, remat_grads, remat_state = _loss_and_grads(family, remat=True)
  assert consulted  # the flag reached the blocks: their operations went through the remat policy
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-5)
  block_grads = [g for module, leaves in grads.items() if 'block' in module for g in leaves.values()]
  assert block_grads and all(np.any(g != 0) for g in block_grads)  # every block takes part
  for module in grads:
    for name in grads[module]:
      np.testing.assert_allclose(remat_grads[module][name], grads[module][name], rtol=2e-4, atol=1e-6,
                                 err_msg=f'{module}/{name}')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), remat_state, state)


def test_remat_is_a_training_only_key_of_every_family():
  # A checkpoint trained with remat is the same model without it (and older checkpoints have no `remat`).
  for family in FAMILIES:
    config = _model_config(family, remat=True).to_dict()
    stored = dict(config, remat=False)
    assert models.contradiction(config, stored) is None
    del stored['remat']
    assert models.contradiction(config, stored) is None


def test_a_non_boolean_remat_is_refused_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'scripts.benchmark', 'memory', '--config', 'configs/nfnet.py:tiny',
                           '--config.model.remat=sometimes'], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode != 0
  assert result.stderr.startswith('error:') and result.stderr.count('\n') == 1, result.stderr
  assert 'remat' in result.stderr
