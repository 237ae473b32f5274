"""create_train_state: fresh, resumed, or initialised from a checkpoint with a new classifier (fine-tuning)."""
import jax
import numpy as np
import pytest

from nfnets import checkpoint
from nfnets import train_state
from nfnets import trainer
from nfnets.data import pipeline
from nfnets.errors import CheckpointError
from tests import tiny_setup


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('source')
  trainer.train_and_evaluate(tiny_setup.tiny_config(), workdir, stop_after_step=10)
  return workdir


def _setup(config):
  return trainer.setup_training(config, tiny_setup.DIGITS_TRAIN_EXAMPLES)


def test_init_from_a_checkpoint_takes_its_ema_weights_and_replaces_a_mismatched_classifier(trained):
  source = checkpoint.read(trained)
  ema_params, _ = source.weight_sets['ema_']
  config = tiny_setup.tiny_config()
  config.model.num_classes = 7
  config.init_from = str(trained)
  state, origin = train_state.create_train_state(_setup(config), config)
  assert 'initialised from' in origin and 'NFNet/~/linear/w' in origin and 'NFNet/~/linear/b' in origin
  assert int(state.step) == 0
  fresh = train_state.fresh_train_state(_setup(config).forward, _setup(config).optimizer, config.seed, 32)
  for module, leaves in state.params.items():
    for name, value in leaves.items():
      expected = fresh.params[module][name] if module == 'NFNet/~/linear' else ema_params[module][name]
      np.testing.assert_array_equal(value, expected)
  # Same class count: every weight, the classifier included, comes from the checkpoint.
  config.model.num_classes = 10
  state, origin = train_state.create_train_state(_setup(config), config)
  assert 'new classifier' not in origin
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ema_params)):
    np.testing.assert_array_equal(a, b)


def test_init_from_refuses_another_architecture(trained):
  config = tiny_setup.tiny_config()
  config.model.widths = (32, 64, 96, 160)
  config.init_from = str(trained)
  with pytest.raises(CheckpointError, match=r'checkpoints/10: NFNet/~/.* has shape .* the model needs'):
    train_state.create_train_state(_setup(config), config)
  config.init_from = str(trained / 'nowhere')
  with pytest.raises(CheckpointError, match='no checkpoint at .*nowhere'):
    train_state.create_train_state(_setup(config), config)


def test_a_checkpoint_written_before_the_loss_scale_fields_resumes_with_their_fresh_values(trained, tmp_path,
                                                                                          monkeypatch):
  config = tiny_setup.tiny_config()
  setup = _setup(config)
  like = train_state.fresh_train_state(setup.forward, setup.optimizer, config.seed, 32, initial_loss_scale=256.0)
  data = pipeline.make_train_iterator(config.data, global_batch_size=config.train.batch_size, seed=config.seed,
                                      num_classes=10)
  source = checkpoint.TrainingCheckpointer(trained / 'checkpoints', save_every=10, keep=3)
  state = source.restore(10, like, data)
  source.close()
  state = state._replace(skipped_overflow=np.int32(5))
  # Write it as the project did before these fields existed: without them in the `train` item.
  split_state = checkpoint.split_state

  def old_split(tree):
    weights, train = split_state(tree)
    return weights, {k: v for k, v in train.items() if k not in checkpoint.ADDED_TRAIN_FIELDS}

  with monkeypatch.context() as patch:
    patch.setattr(checkpoint, 'split_state', old_split)
    old = checkpoint.TrainingCheckpointer(tmp_path / 'old', save_every=1, keep=1)
    old.save(state, data, {})
    old.wait_until_finished()
    old.close()
  resumed = checkpoint.TrainingCheckpointer(tmp_path / 'old', save_every=1, keep=1).restore(10, like, data)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  assert int(resumed.step) == 10
  assert float(resumed.loss_scale) == 256.0 and int(resumed.skipped_overflow) == 0
