"""Checkpoints: the project's orbax format, and one reader for it and the published reference files.

A project checkpoint directory is an orbax `CheckpointManager` directory: one sub-directory per step, each
holding up to four items:

  weights  the train state's weight sets {'params', 'model_state'[, 'ema_params', 'ema_model_state']}: all
           that evaluation and fine-tuning need (a converted reference checkpoint holds only this and `meta`)
  train    every other field of the train state (step, optimiser state, RNG, non-finite streak)
  data     the grain iterator's position, one JSON file per host
  meta     JSON: the run's config, the model config and which weight sets are stored

Paths go through `etils.epath`, so a directory may be local or on a remote filesystem (`gs://...`). Saves
are atomic (orbax finalises a step only once all of it is written), asynchronous, and written from host
copies of the arrays, so the same code serves one CPU and a multi-host pod.

`read(path)` accepts a project checkpoint (a workdir, its checkpoints/ folder or one step's folder), a
reference `F*_haiku.npz` file or a timm NFNet `.safetensors` state dict (`nfnets.timm_weights`), and returns
the model config and the weight sets it holds.
"""
import dataclasses
import json
from typing import TYPE_CHECKING, Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nfnets import models
from nfnets import pretrained
from nfnets import timm_weights
from nfnets.errors import CheckpointError
from nfnets.errors import ConfigError

if TYPE_CHECKING:  # train_state imports this module to resume runs; the annotations only name its TrainState.
  from nfnets import train_state

# TrainState fields stored in the `weights` item; every other field goes to `train`.
WEIGHT_SETS = ('params', 'model_state', 'ema_params', 'ema_model_state')
# `train` fields that checkpoints written before they existed lack; such a run resumes with their fresh
# values (the initial loss scale, no skipped updates).
ADDED_TRAIN_FIELDS = ('loss_scale', 'loss_scale_counter', 'skipped_overflow', 'skipped_nonfinite')
ITEMS = ('weights', 'train', 'data', 'meta')


def absolute(path: str | epath.PathLike) -> epath.Path:
  """`path` as orbax needs it: remote paths unchanged, local ones absolute (with ~ expanded)."""
  path = epath.Path(path)
  return path if '://' in str(path) else path.expanduser().resolve()


def _to_host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def split_state(state: 'train_state.TrainState') -> tuple[dict[str, Any], dict[str, Any]]:
  """(weights item, train item) of a train state, following the state's own fields."""
  fields = state._asdict()
  return ({k: v for k, v in fields.items() if k in WEIGHT_SETS},
          {k: v for k, v in fields.items() if k not in WEIGHT_SETS})


def _manager(directory: str | epath.PathLike, *, save_every: int = 1, keep: Optional[int] = None,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, save_every), max_to_keep=keep, create=not read_only,
      read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(absolute(directory), options=options, item_names=ITEMS)


class TrainingCheckpointer:
  """Saves and resumes a training run's whole state: weights, optimiser, RNG and data position.

  Every host calls every method: orbax coordinates the hosts and writes replicated values once.
  """

  def __init__(self, directory: str | epath.PathLike, *, save_every: int, keep: int):
    self._manager = _manager(directory, save_every=save_every, keep=keep)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def wants(self, step: int, force: bool = False) -> bool:
    """Whether `save` would write `step`: on the save grid (or forced), and not written already."""
    return step not in self._manager.all_steps() and (force or self._manager.should_save(step))

  def save(self, state: 'train_state.TrainState', data_iterator: Any, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves `state` (one device's copy, not the replicated one) if the step is on the grid or `force`."""
    step = int(state.step)
    if not self.wants(step, force):
      return False
    weights, train = split_state(_to_host(state))
    meta = dict(meta, step=step, weight_sets=list(weights))
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        weights=ocp.args.StandardSave(weights),
        train=ocp.args.StandardSave(train),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, like: 'train_state.TrainState',
              data_iterator: Any) -> 'train_state.TrainState':
    """Restores step `step` into a state shaped like `like` and repositions `data_iterator` in place."""
    weights, train = split_state(like)
    stored = set(ocp.StandardCheckpointHandler().metadata(self._manager.directory / str(step) / 'train').keys())
    missing = {name: train.pop(name) for name in ADDED_TRAIN_FIELDS if name not in stored}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        weights=ocp.args.StandardRestore(_abstract(weights)),
        train=ocp.args.StandardRestore(_abstract(train)),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return type(like)(**restored.weights, **restored.train, **missing)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def save_weights(directory: str | epath.PathLike, params, model_state, meta: dict[str, Any],
                 step: int = 0) -> None:
  """Writes a weights-only checkpoint (e.g. a converted reference model). Refuses an existing directory."""
  if epath.Path(directory).exists():
    raise CheckpointError(f'{directory} already exists; choose a new output directory')
  manager = _manager(directory)
  weights = {'params': _to_host(params), 'model_state': _to_host(model_state)}
  manager.save(step, args=ocp.args.Composite(
      weights=ocp.args.StandardSave(weights),
      meta=ocp.args.JsonSave(dict(meta, step=step, weight_sets=list(weights)))))
  manager.wait_until_finished()
  manager.close()


def _resolve(path: epath.Path) -> tuple[epath.Path, int]:
  """Accepts a checkpoint directory (latest step), one step's directory, or a training workdir."""
  path = absolute(path)
  if not path.is_dir():
    raise CheckpointError(f'no checkpoint at {path}')
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  if (path / 'weights').is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  step = _manager(path, read_only=True).latest_step()
  if step is None:
    raise CheckpointError(f'{path} holds no complete checkpoint')
  return path, step


def _read_meta(directory: epath.Path, step: int) -> dict[str, Any]:
  meta_file = directory / str(step) / 'meta' / 'metadata'
  try:
    return json.loads(meta_file.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'unreadable checkpoint metadata {meta_file}: {e}') from e


@dataclasses.dataclass
class Checkpoint:
  """What `read` returns.

  Attributes:
    path: the file, or the step directory, that was read.
    kind: 'project' (orbax, written by this project), 'reference' (a published pickle) or 'timm' (a timm
      NFNet state dict in a .safetensors file).
    model_config: the `config.model` section that builds the stored model.
    weight_sets: `{prefix: (params, model_state)}` with '' for the raw weights and 'ema_' for the EMA weights
      when stored; numpy arrays.
    config: the whole config of the run that wrote it (project checkpoints), else None.
    step: the training step it was saved at (0 for reference and timm files).
  """
  path: str
  kind: str
  model_config: dict[str, Any]
  weight_sets: dict[str, tuple[Any, Any]]
  config: Optional[dict[str, Any]]
  step: int


FILE_KINDS = ('reference', 'timm')


def file_kind(path: str | epath.PathLike) -> str:
  """Which kind of weights file `path` names, by its suffix: 'timm' for .safetensors, else 'reference'."""
  return 'timm' if epath.Path(path).suffix == '.safetensors' else 'reference'


def read(path: str | epath.PathLike, file_format: Optional[str] = None) -> Checkpoint:
  """Reads a project checkpoint, a reference `F*_haiku.npz` file or a timm `.safetensors` file.

  `file_format` ('reference' or 'timm') insists on a file of that kind; by default a file's suffix decides.
  Every error names the path.
  """
  source = epath.Path(path)
  if file_format is not None and file_format not in FILE_KINDS:
    raise CheckpointError(f'unknown weights file format {file_format!r}; known: {", ".join(FILE_KINDS)}')
  if file_format is not None and not source.is_file():
    raise CheckpointError(f'{source} is not a file; a {file_format} checkpoint is one file')
  if source.is_file():
    kind = file_format or file_kind(source)
    load = timm_weights.load if kind == 'timm' else pretrained.load_reference
    params, model_config = load(source)
    return Checkpoint(str(source), kind, model_config, {'': (params, {})}, None, 0)
  directory, step = _resolve(source)
  meta = _read_meta(directory, step)
  try:
    model_config = meta['model']
    like_params, like_state = models.abstract_params(model_config)
  except (KeyError, TypeError, ConfigError) as e:
    raise CheckpointError(f'{directory / str(step)}: no usable model config in its metadata ({e})') from None
  like = {'params': like_params, 'model_state': like_state,
          'ema_params': like_params, 'ema_model_state': like_state}
  target = {name: _abstract(like[name]) for name in meta.get('weight_sets', []) if name in like}
  try:
    restored = _manager(directory, read_only=True).restore(
        step, args=ocp.args.Composite(weights=ocp.args.StandardRestore(target)))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f'checkpoint {directory / str(step)} is damaged or does not fit its model: '
                          f'{str(e).splitlines()[0]}') from e
  weights = dict(restored.weights)
  # Orbax restores numpy arrays in their stored shapes whatever the target's: a model config that the stored
  # weights do not fit (same modules, other widths) must be caught here, not by the first forward pass.
  for (key, needed), leaf in zip(jax.tree_util.tree_leaves_with_path(target), jax.tree.leaves(weights)):
    if np.shape(leaf) != needed.shape:
      raise CheckpointError(f'checkpoint {directory / str(step)} does not fit its model: {jax.tree_util.keystr(key)} '
                            f'has shape {np.shape(leaf)}, the model needs {needed.shape}')
  weight_sets = {'': (weights['params'], weights['model_state'])}
  if 'ema_params' in weights:
    weight_sets['ema_'] = (weights['ema_params'], weights['ema_model_state'])
  return Checkpoint(str(directory / str(step)), 'project', model_config, weight_sets, meta.get('config'), step)
