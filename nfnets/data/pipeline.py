"""grain input pipelines: resumable, host-sharded training batches and exact evaluation batches.

Training: the whole split, shuffled (reshuffled every epoch) and repeated, is one global stream; global
batch `s` is positions [s * B, (s + 1) * B), and each host decodes only its contiguous slice of every global
batch -> per example: decode with random-resized crop, flip (and RandAugment when it runs before mixing)
-> batch -> per batch: MixUp/CutMix, RandAugment after mixing, normalise -> thread prefetch (optionally
worker processes) -> reshape to [local_devices, per_device, ...].

The order and every per-example random choice (crop, flip, RandAugment) are functions of (seed, global
position) alone, so the global batch of a step is the same whatever the number of hosts and devices; only
MixUp/CutMix pair and draw within each host's slice. The returned iterator's state (a small JSON-able dict)
restores it exactly, also through `grain.checkpoint.CheckpointSave/CheckpointRestore` in an orbax checkpoint.

Evaluation visits each example of this host's slice once, in order, then pads with masked
zero examples so that every host yields the same number of full batches (`num_eval_batches`),
which keeps multi-host collectives in step.

Normalisation runs inside the parallel stages (prefetch threads or worker processes), so the
consumer's thread only reshapes; prefetch buffers are bounded to one batch per thread.
"""
import dataclasses
import functools
import math
import os
from typing import Any, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from nfnets.data import mix
from nfnets.data import ops_image
from nfnets.data import randaugment
from nfnets.data import sources
from nfnets.errors import ConfigError

MIX_MODES = ('mixup_cutmix', 'none')


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
) -> grain.DatasetIterator:
  """An endless, resumable iterator of training batches for this host.

  Yields {'images': float32 [local_devices, per_device, R, R, 3] normalised,
  'labels': float32 [local_devices, per_device, num_classes] (mixed one-hot)}, R =
  `data_config.train_resolution`. `get_state()`/`set_state()` (or grain.checkpoint) resume it
  exactly; a state only fits an iterator built with the same config, seed and host layout.
  """
  process_index, process_count, local_device_count = _host_layout(
      process_index, process_count, local_device_count)
  per_host = host_batch_size(global_batch_size, process_count, local_device_count)
  if data_config.mix not in MIX_MODES:
    raise ConfigError(f'Unknown config.data.mix {data_config.mix!r}; use one of {MIX_MODES}.')
  source = sources.get_source(data_config, data_config.train_split)
  if len(source) < global_batch_size:
    raise ConfigError(f'the training split holds {len(source)} examples, fewer than the global batch of '
                      f'{global_batch_size}; use a smaller batch')
  shuffle_seed, example_seed, batch_seed = _seeds(seed)
  layers = data_config.randaugment_layers
  augment_before_mix = layers > 0 and not data_config.randaugment_after_mix
  augment_after_mix = layers > 0 and data_config.randaugment_after_mix
  global_stream = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  dataset = (
      _HostSliceOfGlobalBatches(global_stream, global_batch_size=global_batch_size, per_host=per_host,
                                process_index=process_index)
      .map(_CropFlipAugment(
          seed=example_seed,
          resolution=data_config.train_resolution,
          area_range=(data_config.crop_min_area, 1.0),
          flip=data_config.flip,
          randaugment_layers=layers if augment_before_mix else 0,
          randaugment_magnitude=data_config.randaugment_magnitude))
      .batch(per_host, drop_remainder=True)
      .map(_MixAndAugmentBatch(
          seed=batch_seed,
          num_classes=num_classes,
          mix=data_config.mix,
          mixup_alpha=data_config.mixup_alpha,
          randaugment_layers=layers if augment_after_mix else 0,
          randaugment_magnitude=data_config.randaugment_magnitude))
  )
  return _finish(dataset, local_device_count, {'images': 'image', 'labels': 'targets'},
                 num_workers=data_config.get('num_workers', 0) or 0)


def make_eval_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
) -> grain.DatasetIterator:
  """A finite iterator over `data_config.eval_split`, each example of this host's slice once.

  Yields `num_eval_batches(...)` batches {'images': float32 [ld, pd, R, R, 3] normalised,
  'labels': int32 [ld, pd], 'mask': float32 [ld, pd]}; padding examples are zeros with mask 0.
  """
  process_index, process_count, local_device_count = _host_layout(
      process_index, process_count, local_device_count)
  per_host = host_batch_size(global_batch_size, process_count, local_device_count)
  source = sources.get_source(data_config, data_config.eval_split)
  num_batches = _num_eval_batches(len(source), per_host, process_count)
  padded = _PaddedHostSlice(source, process_index, process_count, num_batches * per_host)
  dataset = (
      grain.MapDataset.source(padded)
      .map(_EvalPreprocess(data_config.eval_resolution, data_config.eval_resize_margin))
      .batch(per_host, drop_remainder=True)
  )
  # Threads only: worker processes cost seconds to start per evaluation, and grain 0.2.18
  # leaks their shared memory when a finite iterator runs out.
  return _finish(dataset, local_device_count,
                 {'images': 'image', 'labels': 'label', 'mask': 'mask'}, num_workers=0)


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
  # Independent streams for order, per-example and per-batch randomness; grain wants plain non-negative ints.
  return [int(s) for s in np.random.SeedSequence([seed]).generate_state(3)]


class _HostSliceOfGlobalBatches(grain.MapDataset):
  """This host's contiguous slice of every global batch of `parent` (a global, endless example stream).

  Local position k is global position (k // per_host) * global_batch_size + process_index * per_host
  + k % per_host. Random maps after this stage are seeded by the local position, which
  `_CropFlipAugment` does not use: it draws from the global position carried in the example.
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
    return {**self._parent[position], 'position': position}

  def __str__(self) -> str:
    return f'HostSliceOfGlobalBatches(per_host={self._per_host}, offset={self._offset})'


def _finish(dataset: grain.MapDataset, local_device_count: int, output_keys: dict[str, str], *,
            num_workers: int) -> grain.DatasetIterator:
  threads = max(1, min(16, os.cpu_count() or 1))
  # One batch per thread in flight: enough overlap, and bounded memory for large batches.
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
  if num_workers > 0:
    _allow_grain_multiprocessing()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  iter_dataset = iter_dataset.map(
      functools.partial(_to_device_layout, local_device_count=local_device_count,
                        output_keys=output_keys))
  return iter(iter_dataset)


def _allow_grain_multiprocessing() -> None:
  # grain's worker processes read absl flags; outside `app.run` (tests, notebooks) nothing has
  # parsed them and grain would fail with UnparsedFlagAccessError.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _to_device_layout(batch: dict[str, np.ndarray], *, local_device_count: int,
                      output_keys: dict[str, str]) -> dict[str, np.ndarray]:
  out = {}
  for out_key, key in output_keys.items():
    value = batch[key]
    out[out_key] = value.reshape((local_device_count, -1) + value.shape[1:])
  return out


def _rng(seed: int, position: int) -> np.random.Generator:
  """The random stream of one global stream position: the same on any host layout."""
  return np.random.default_rng([seed, int(position)])


@dataclasses.dataclass
class _CropFlipAugment(grain.transforms.Map):
  """Encoded example -> uint8 training crop (and RandAugment when it precedes mixing)."""
  seed: int
  resolution: int
  area_range: tuple[float, float]
  flip: bool
  randaugment_layers: int
  randaugment_magnitude: float

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    rng = _rng(self.seed, example['position'])
    image = ops_image.decode_random_resized_crop(
        example['image'], rng, self.resolution, area_range=self.area_range)
    if self.flip:
      image = ops_image.random_flip(image, rng)
    if self.randaugment_layers:
      image = randaugment.randaugment(
          image, rng, self.randaugment_layers, self.randaugment_magnitude)
    return {'image': image, 'label': np.int32(example['label']), 'position': np.int64(example['position'])}


@dataclasses.dataclass
class _MixAndAugmentBatch(grain.transforms.Map):
  """uint8 batch with integer labels -> mixed, normalised float32 images and soft targets."""
  seed: int
  num_classes: int
  mix: str
  mixup_alpha: float
  randaugment_layers: int
  randaugment_magnitude: float

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    images, labels, positions = batch['image'], batch['label'], batch['position']
    if np.any((labels < 0) | (labels >= self.num_classes)):
      raise ValueError(f'Labels must lie in [0, {self.num_classes}); check num_classes against '
                       'the dataset.')
    if self.mix == 'mixup_cutmix':
      images, targets = mix.mixup_cutmix(
          images, labels, self.num_classes, _rng(self.seed, positions[0]), alpha=self.mixup_alpha)
    else:
      targets = np.eye(self.num_classes, dtype=np.float32)[labels]
    if self.randaugment_layers:
      images = np.stack([
          randaugment.randaugment(image, _rng(self.seed, position), self.randaugment_layers,
                                  self.randaugment_magnitude)
          for image, position in zip(images, positions)])
    return {'image': np.asarray(ops_image.normalize(images), np.float32),
            'targets': np.asarray(targets, dtype=np.float32)}


class _EvalPreprocess(grain.transforms.Map):
  """Encoded example (or padding) -> normalised eval image, label and mask (padding: zeros)."""

  def __init__(self, resolution: int, margin: int):
    self.resolution = resolution
    self.margin = margin

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    if _PADDING_KEY in example:
      return {'image': np.zeros((self.resolution, self.resolution, 3), np.float32),
              'label': np.int32(0), 'mask': np.float32(0.0)}
    image = ops_image.eval_resize_and_crop(
        ops_image.decode_image(example['image']), self.resolution, margin=self.margin)
    return {'image': np.asarray(ops_image.normalize(image), np.float32),
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
