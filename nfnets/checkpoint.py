"""The project's checkpoint format, on orbax.

A checkpoint directory is an orbax `CheckpointManager` directory: one sub-directory per step, each holding
up to four items:

  weights  {'params', 'model_state'[, 'ema_params', 'ema_model_state']}: all that evaluation and
           fine-tuning need (a converted reference checkpoint holds only this and `meta`)
  train    {'step', 'opt_state', 'rng', 'nonfinite_streak'}: the rest of the training state
  data     the grain iterator's position, one JSON file per host
  meta     JSON: the run's config, the model config and which weight sets are stored

Saves are atomic (orbax writes to a temporary directory and renames it), asynchronous, and written from
host copies of the arrays, so the same code serves one CPU and a multi-host pod (orbax writes replicated
numpy values from the primary host only).
"""
import json
import os
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets import train_step as train_step_lib

WEIGHT_SETS = ('params', 'model_state', 'ema_params', 'ema_model_state')
ITEMS = ('weights', 'train', 'data', 'meta')


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable or does not fit the model asked for."""


def _to_host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _manager(directory: str, *, save_every: int = 1, keep: Optional[int] = None,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, save_every), max_to_keep=keep, create=not read_only,
      read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


class TrainingCheckpointer:
  """Saves and resumes a training run's whole state: weights, optimiser, RNG and data position."""

  def __init__(self, directory: str, *, save_every: int, keep: int):
    self._manager = _manager(directory, save_every=save_every, keep=keep)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def wants(self, step: int, force: bool = False) -> bool:
    """Whether `save` would write `step`: on the save grid (or forced), and not written already."""
    return step not in self._manager.all_steps() and (force or self._manager.should_save(step))

  def save(self, state: train_step_lib.TrainState, data_iterator: Any, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves `state` (one device's copy, not the replicated one) if the step is on the grid or `force`."""
    step = int(state.step)
    if not self.wants(step, force):
      return False
    host = _to_host(state)
    weights = {name: getattr(host, name) for name in WEIGHT_SETS}
    train = {'step': host.step, 'opt_state': host.opt_state, 'rng': host.rng,
             'nonfinite_streak': host.nonfinite_streak}
    meta = dict(meta, step=step, weight_sets=list(WEIGHT_SETS))
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        weights=ocp.args.StandardSave(weights),
        train=ocp.args.StandardSave(train),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, like: train_step_lib.TrainState,
              data_iterator: Any) -> train_step_lib.TrainState:
    """Restores step `step` into a state shaped like `like` and repositions `data_iterator` in place."""
    weights_target = {name: _abstract(getattr(like, name)) for name in WEIGHT_SETS}
    train_target = _abstract({'step': like.step, 'opt_state': like.opt_state, 'rng': like.rng,
                              'nonfinite_streak': like.nonfinite_streak})
    restored = self._manager.restore(step, args=ocp.args.Composite(
        weights=ocp.args.StandardRestore(weights_target),
        train=ocp.args.StandardRestore(train_target),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return train_step_lib.TrainState(**restored.weights, **restored.train)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def save_weights(directory: str, params, model_state, meta: dict[str, Any], step: int = 0) -> None:
  """Writes a weights-only checkpoint (e.g. a converted reference model). Refuses an existing directory."""
  if os.path.exists(directory):
    raise CheckpointError(f'{directory} already exists; choose a new output directory')
  manager = _manager(directory)
  weights = {'params': _to_host(params), 'model_state': _to_host(model_state)}
  manager.save(step, args=ocp.args.Composite(
      weights=ocp.args.StandardSave(weights),
      meta=ocp.args.JsonSave(dict(meta, step=step, weight_sets=['params', 'model_state']))))
  manager.wait_until_finished()
  manager.close()


def _resolve(path: str) -> tuple[str, int]:
  """Accepts a checkpoint directory (latest step), one step's directory, or a training workdir."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'no checkpoint at {path}')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  if os.path.isdir(os.path.join(path, 'weights')) and os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  step = _manager(path, read_only=True).latest_step()
  if step is None:
    raise CheckpointError(f'{path} holds no complete checkpoint')
  return path, step


def _read_meta(directory: str, step: int) -> dict[str, Any]:
  meta_dir = os.path.join(directory, str(step), 'meta')
  try:
    with open(os.path.join(meta_dir, 'metadata')) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'unreadable checkpoint metadata in {meta_dir}: {e}') from e


def read_meta(path: str) -> dict[str, Any]:
  """The `meta` item (config, model config, stored weight sets) of the checkpoint at `path`."""
  return _read_meta(*_resolve(path))


def load_weights(path: str, like_params, like_model_state) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads every stored weight set, shaped like the given (abstract) params, and the checkpoint's meta.

  Returns `({name: tree}, meta)` with names from `WEIGHT_SETS` that the checkpoint holds.
  """
  directory, step = _resolve(path)
  meta = _read_meta(directory, step)
  stored = [n for n in meta.get('weight_sets', []) if n in WEIGHT_SETS]
  like = {'params': like_params, 'model_state': like_model_state,
          'ema_params': like_params, 'ema_model_state': like_model_state}
  target = {name: _abstract(like[name]) for name in stored}
  try:
    restored = _manager(directory, read_only=True).restore(
        step, args=ocp.args.Composite(weights=ocp.args.StandardRestore(target)))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f'checkpoint {directory}/{step} does not fit this model: '
                          f'{str(e).splitlines()[0]}') from e
  return dict(restored.weights), meta
