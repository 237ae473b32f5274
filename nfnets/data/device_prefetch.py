"""Training batches copied to the devices ahead of the step that consumes them, resumable exactly.

The host iterator's position is recorded before each batch is taken from it, so the position reported
(and checkpointed) is that of the next batch the *step* will consume, not of the batches already queued
on the devices: a run resumed from a checkpoint sees the same batches as one never stopped.
"""
import collections
import json
from typing import Any, Iterator

import grain

from nfnets import distributed


class DevicePrefetch:
  """Iterates `host_iterator`'s batches placed on the local devices, keeping `size` batches queued there.

  Each batch is laid out as `distributed.shard` lays it (leading axis across the local devices), what the
  pmapped train step takes; later batches are copied while earlier steps run. `get_state`/`set_state` speak the
  protocol of `grain.checkpoint` for iterators of its own kind (the host iterator's JSON state as bytes),
  so checkpoints hold the same file either way.
  """

  def __init__(self, host_iterator: Iterator[Any], size: int, axis_name: str, devices=None):
    if size < 1:
      raise ValueError(f'device prefetch size must be at least 1, got {size}')
    self._host = host_iterator
    self._size = size
    self._axis_name = axis_name
    self._devices = devices
    self._queue: collections.deque = collections.deque()  # (host position before the batch; batch on devices)
    self._host_exhausted = False

  def __iter__(self) -> 'DevicePrefetch':
    return self

  def __next__(self) -> Any:
    # Refilled on entry, not before returning: the caller dispatches its step with this batch first, and
    # the host's next batches are then read and copied while that step runs.
    self._fill()
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()[1]

  def _fill(self) -> None:
    while len(self._queue) < self._size and not self._host_exhausted:
      position = self._host_position()
      try:
        host_batch = next(self._host)
      except StopIteration:  # a finite host iterator: hand out what is queued, then stop
        self._host_exhausted = True
        return
      self._queue.append((position, distributed.shard(host_batch, self._axis_name, self._devices)))

  def _host_position(self) -> bytes:
    """The host iterator's state as grain's checkpoint handler would write it (a snapshot: bytes)."""
    state = self._host.get_state()
    if isinstance(self._host, grain.DatasetIterator):
      return json.dumps(state, indent=4).encode()
    return state

  def get_state(self) -> bytes:
    """The host iterator's position at the next batch `__next__` returns."""
    return self._queue[0][0] if self._queue else self._host_position()

  def set_state(self, state: bytes) -> None:
    self._queue.clear()
    self._host_exhausted = False
    self._host.set_state(json.loads(state) if isinstance(self._host, grain.DatasetIterator) else state)

  def start_prefetch(self) -> None:
    """Lets the host iterator start reading ahead (grain's checkpoint handler calls it after a restore)."""
    if hasattr(self._host, 'start_prefetch'):
      self._host.start_prefetch()

  def close(self) -> None:
    self._queue.clear()
    if hasattr(self._host, 'close'):
      self._host.close()
