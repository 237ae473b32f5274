"""grain input pipelines: resumable, host-sharded training batches and exact evaluation batches.

Training: the whole split, shuffled (reshuffled every epoch) and repeated, is one global stream of
source examples, grouped into training examples: consecutive pairs with MixUp/CutMix (every crop used
once, as the reference's 2B crops per B examples), single examples without. Global batch `s` is
training examples [s * B, (s + 1) * B), and each host decodes only its contiguous slice of every
global batch -> per training example: crops, mixing, uint8, RandAugment
(`train_transform.TrainTransform`) -> chunks of consecutive examples, made by worker processes (or
threads) -> stacked into the host batch, reshaped to [local_devices, per_device, ...]
(`workers.py`: how many workers, the memory in flight). Training images leave as uint8 pixels; the train
step normalises them on the device.

The order and every random choice (crops, flips, mixing, RandAugment) are functions of (seed, global
position of the training example) alone, so the global batch of a step is the same whatever the number
of hosts and devices, given the per-device batch size (which decides where MixUp ends and CutMix starts
in each device's batch). The returned iterator's state (a small JSON-able dict: host batches handed
out) restores it exactly, with any number of workers, also through
`grain.checkpoint.CheckpointSave/CheckpointRestore` in an orbax checkpoint.

Evaluation visits each example of this host's slice once, in order, then pads with masked
zero examples so that every host yields the same number of full batches (`num_eval_batches`),
which keeps multi-host collectives in step. Its images leave as float32 pixels (the reference's resize
output, fractional and unclipped); the eval step normalises them on the device, as the train step does.

All the work runs inside the parallel stages (worker processes or threads), so the consumer's thread
only stacks chunks; each thread holds one chunk in flight, not a host batch.
"""
import functools
import math
from typing import Any, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from nfnets.data import ops_image
from nfnets.data import sources
from nfnets.data import train_transform
from nfnets.data import workers
from nfnets.errors import ConfigError


def host_batch_size(global_batch_size: int, process_count: int, local_device_count: int) -> int:
  """This host's share of the global batch; must split evenly over hosts and local devices."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(f'Global batch size {global_batch_size} must be a positive multiple of the '
                     f'process count {process_count}.')
  per_host = global_batch_size // process_count
  if per_host % local_device_count:
    raise ConfigError(f'Per-host batch {per_host} (global {global_batch_size} / {process_count} '
                     f'hosts) must be divisible by the {local_device_count} local devices.')
  return per_host


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    num_classes: int,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    source: Sequence[dict[str, Any]] | None = None,
    accumulation_steps: int = 1,
) -> grain.DatasetIterator:
  """An endless, resumable iterator of training batches for this host.

  Yields {'images': uint8 [local_devices, per_device, R, R, 3] (not normalised),
  'labels': float32 [local_devices, per_device, num_classes] (mixed one-hot)}, R =
  `data_config.train_resolution`. With MixUp/CutMix each batch consumes twice as many source
  examples as it holds. `get_state()`/`set_state()` (or grain.checkpoint) resume it exactly; a
  state only fits an iterator built with the same config, seed and host layout. `source` replaces
  the training split (`sources.get_source(data_config, data_config.train_split)`), e.g. for a
  benchmark.

  With `accumulation_steps` k the train step runs each device batch as k consecutive micro-batches
  (`nfnets.accumulation`): the examples are the same, but MixUp and CutMix split each micro-batch
  (the batch one forward pass sees, as the reference's device batch was) rather than the device batch.
  """
  process_index, process_count, local_device_count = _host_layout(
      process_index, process_count, local_device_count)
  per_host = host_batch_size(global_batch_size, process_count, local_device_count)
  per_device = per_host // local_device_count
  if accumulation_steps < 1 or per_device % accumulation_steps:
    raise ConfigError(f'Per-device batch {per_device} must split into {accumulation_steps} micro-batches.')
  transform = train_transform.TrainTransform.from_config(
      data_config, num_classes=num_classes, per_device=per_device // accumulation_steps)
  if source is None:
    source = sources.get_source(data_config, data_config.train_split)
  sources_per_batch = global_batch_size * transform.crops_per_example
  if len(source) < sources_per_batch:
    raise ConfigError(f'the training split holds {len(source)} examples, fewer than the '
                      f'{sources_per_batch} a global batch of {global_batch_size} is made from; use a '
                      'smaller batch')
  shuffle_seed, example_seed = _seeds(seed)
  training_examples = (
      grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
      .batch(transform.crops_per_example, drop_remainder=True, batch_fn=tuple))
  examples = (
      _HostSliceOfGlobalBatches(training_examples, global_batch_size=global_batch_size,
                                per_host=per_host, process_index=process_index)
      .map(_TrainExample(transform, seed=example_seed)))
  example_bytes = train_example_bytes(data_config.train_resolution, num_classes)
  return _host_batches(examples, per_host, example_bytes, local_device_count,
                       {'images': 'image', 'labels': 'targets'}, _worker_layout(data_config))


def make_eval_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    source: Sequence[dict[str, Any]] | None = None,
) -> grain.DatasetIterator:
  """A finite iterator over `data_config.eval_split` (or `source`), each example of this host's slice once.

  Yields `num_eval_batches(...)` batches {'images': float32 [ld, pd, R, R, 3] pixels (`ops_image.eval_pixels`:
  0-255 scale, not normalised, as the eval step normalises them on the device), 'labels': int32 [ld, pd],
  'mask': float32 [ld, pd]}; padding examples are zeros with mask 0.
  """
  process_index, process_count, local_device_count = _host_layout(
      process_index, process_count, local_device_count)
  per_host = host_batch_size(global_batch_size, process_count, local_device_count)
  if source is None:
    source = sources.get_source(data_config, data_config.eval_split)
  num_batches = _num_eval_batches(len(source), per_host, process_count)
  padded = _PaddedHostSlice(source, process_index, process_count, num_batches * per_host)
  examples = grain.MapDataset.source(padded).map(
      _EvalPreprocess(data_config.eval_resolution, data_config.eval_resize_margin))
  # The same workers as training: at large resolutions the eval transform costs several times the
  # training one per image. The iterator stops (and shuts them down) after its last batch.
  return _host_batches(examples, per_host, eval_example_bytes(data_config.eval_resolution),
                       local_device_count, {'images': 'image', 'labels': 'label', 'mask': 'mask'},
                       _worker_layout(data_config), num_batches=num_batches)


def num_eval_batches(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_count: int | None = None,
    local_device_count: int | None = None,
) -> int:
  """How many batches `make_eval_iterator` yields (the same on every host)."""
  _, process_count, local_device_count = _host_layout(0, process_count, local_device_count)
  per_host = host_batch_size(global_batch_size, process_count, local_device_count)
  num_examples = len(sources.get_source(data_config, data_config.eval_split))
  return _num_eval_batches(num_examples, per_host, process_count)


def _num_eval_batches(num_examples: int, per_host: int, process_count: int) -> int:
  largest_host_slice = math.ceil(num_examples / process_count)
  return math.ceil(largest_host_slice / per_host)


def _host_layout(process_index, process_count, local_device_count) -> tuple[int, int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_device_count = (jax.local_device_count() if local_device_count is None
                        else local_device_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is outside [0, {process_count}).')
  if local_device_count <= 0:
    raise ValueError(f'local_device_count must be positive, got {local_device_count}.')
  return process_index, process_count, local_device_count


def _seeds(seed: int) -> list[int]:
  # Independent streams for the order and the per-example randomness; grain wants plain non-negative ints.
  return [int(s) for s in np.random.SeedSequence([seed]).generate_state(2)]


class _HostSliceOfGlobalBatches(grain.MapDataset):
  """This host's contiguous slice of every global batch of `parent` (a global, endless example stream).

  Local position k is global position (k // per_host) * global_batch_size + process_index * per_host
  + k % per_host; elements are {'sources': the parent's element, 'position': global position}. Random
  maps after this stage would be seeded by the local position, so `_TrainExample` draws from the
  global position instead.
  """

  def __init__(self, parent: grain.MapDataset, *, global_batch_size: int, per_host: int, process_index: int):
    super().__init__(parent)
    self._global_batch_size = global_batch_size
    self._per_host = per_host
    self._offset = process_index * per_host

  def __len__(self) -> int:
    return len(self._parent) // self._global_batch_size * self._per_host

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, within = divmod(index, self._per_host)
    position = step * self._global_batch_size + self._offset + within
    return {'sources': self._parent[position], 'position': position}

  def __str__(self) -> str:
    return f'HostSliceOfGlobalBatches(per_host={self._per_host}, offset={self._offset})'


def train_example_bytes(resolution: int, num_classes: int) -> int:
  """Bytes of one training example as it leaves the workers: uint8 pixels, float32 targets."""
  return resolution * resolution * 3 + 4 * num_classes


def eval_example_bytes(resolution: int) -> int:
  """Bytes of one evaluation example: float32 pixels, int32 label, float32 mask.

  The pixels stay float32 (not uint8 as in training): the reference's evaluation resize leaves fractional,
  unclipped values, and rounding them would change the evaluation results.
  """
  return 4 * resolution * resolution * 3 + 8


def _worker_layout(data_config: ml_collections.ConfigDict) -> workers.WorkerLayout:
  return workers.WorkerLayout.from_config(data_config.get('num_workers', workers.AUTO))


def _host_batches(examples: grain.MapDataset, per_host: int, example_bytes: int,
                  local_device_count: int, output_keys: dict[str, str], layout: workers.WorkerLayout,
                  num_batches: int | None = None) -> workers.HostBatchIterator:
  chunk = workers.chunk_size(per_host, example_bytes)
  return workers.HostBatchIterator(
      examples.batch(chunk, drop_remainder=True), chunks_per_batch=per_host // chunk, layout=layout,
      to_host_batch=functools.partial(_to_device_layout, local_device_count=local_device_count,
                                      output_keys=output_keys),
      num_batches=num_batches)


def _to_device_layout(batch: dict[str, np.ndarray], *, local_device_count: int,
                      output_keys: dict[str, str]) -> dict[str, np.ndarray]:
  out = {}
  for out_key, key in output_keys.items():
    value = batch[key]  # [chunks, chunk, ...]: the host batch's examples in order
    out[out_key] = value.reshape((local_device_count, -1) + value.shape[2:])
  return out


def _rng(seed: int, position: int) -> np.random.Generator:
  """The random stream of one global stream position: the same on any host layout."""
  return np.random.default_rng([seed, int(position)])


class _TrainExample(grain.transforms.Map):
  """{'sources', 'position'} -> uint8 training image and soft target, random by global position."""

  def __init__(self, transform: train_transform.TrainTransform, *, seed: int):
    self.transform = transform
    self.seed = seed

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    position = element['position']
    # Device batches (micro-batches under accumulation) are contiguous runs of per_device examples of the
    # global stream.
    return self.transform(element['sources'], position % self.transform.per_device,
                          _rng(self.seed, position))


class _EvalPreprocess(grain.transforms.Map):
  """Encoded example (or padding) -> eval pixels (not normalised), label and mask (padding: zeros)."""

  def __init__(self, resolution: int, margin: int):
    self.resolution = resolution
    self.margin = margin

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    if _PADDING_KEY in example:
      return {'image': np.zeros((self.resolution, self.resolution, 3), np.float32),
              'label': np.int32(0), 'mask': np.float32(0.0)}
    return {'image': ops_image.eval_pixels(example['image'], self.resolution, self.margin),
            'label': np.int32(example['label']), 'mask': np.float32(1.0)}


# grain drops None elements as filtered, so padding travels as a marked dict.
_PADDING_KEY = 'padding'


class _PaddedHostSlice(Sequence):
  """Examples process_index, process_index + process_count, ... then padding up to `length`."""

  def __init__(self, source: Sequence[Any], process_index: int, process_count: int, length: int):
    self._source = source
    self._indices = range(process_index, len(source), process_count)
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._length:
      raise IndexError(f'index {index} out of range for {self._length} examples')
    if index < len(self._indices):
      return self._source[self._indices[index]]
    return {_PADDING_KEY: True}

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return (self[index] for index in range(self._length))
