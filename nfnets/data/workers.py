"""The input workers of one training process: how many, how many threads, how much memory in flight.

A host batch (4096 images at 192² is 470 MB of uint8 pixels and float32 targets) is made in *chunks*:
runs of consecutive examples of the host's slice, each at most `CHUNK_BYTES` (64 examples at 192², 2 at
576² in float32). Worker processes (or, without workers, threads of the training process) each make
whole chunks; the training process stacks `chunks_per_batch` of them, in order, into the host batch.
So the memory in flight grows with the number of workers by chunks, not by host batches
(`memory_in_flight_bytes`), and the examples and their order are those of the unchunked stream.

Sizing, by default (`config.data.num_workers = -1`):

- cores: `os.sched_getaffinity(0)`, the cores this process may run on (not `os.cpu_count()`, the
  machine's). When the launcher pinned the process to part of the machine (SLURM task binding,
  `taskset`, a cpuset) those cores are its own. When it may run everywhere, the training processes of
  the host share them: the count comes from the first of `LOCAL_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_SIZE`
  or `SLURM_NTASKS_PER_NODE` that is set (else 1), and each process takes an equal share.
- workers: one per core, less one left to the training process's own loop (host-to-device copies, the
  stacking of chunks), at least one.
- threads per worker: two threads per core in all (at least two per worker): while one thread of a
  worker waits on a read (a remote file system) or runs code that releases the GIL (JPEG decoding, numpy),
  the other computes.

`num_workers = 0` makes every chunk in the training process with threads; `N > 0` asks for N workers.
The iterator's position counts host batches, so a run may resume with another number of workers.
"""
import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Optional

import grain

from nfnets.errors import ConfigError

AUTO = -1
# Per chunk: enough examples that a worker's per-element overhead is small next to the work, few
# enough bytes that hundreds of workers with a few chunks each stay within a few GB.
CHUNK_BYTES = 8 * 2**20
MAX_THREADS = 16
LOCAL_PROCESS_COUNT_VARIABLES = ('LOCAL_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_SIZE', 'SLURM_NTASKS_PER_NODE')


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity)."""
  return len(os.sched_getaffinity(0))


def processes_sharing_cores(environ: Mapping[str, str], usable: int, machine: int) -> int:
  """How many training processes share this process's cores (see the module docstring)."""
  if usable < machine:
    return 1  # pinned by the launcher: these cores are this process's own
  for name in LOCAL_PROCESS_COUNT_VARIABLES:
    value = environ.get(name, '').strip()
    if value.isdigit() and int(value) > 0:
      return int(value)
  return 1


def input_cores(environ: Optional[Mapping[str, str]] = None) -> int:
  """The cores this training process's input pipeline should use: its share of its usable cores."""
  usable = usable_cores()
  sharing = processes_sharing_cores(os.environ if environ is None else environ, usable,
                                    os.cpu_count() or usable)
  return max(1, usable // sharing)


@dataclasses.dataclass(frozen=True)
class WorkerLayout:
  """Worker processes (0: threads of the training process only) and threads in each."""
  workers: int
  threads: int

  @classmethod
  def for_cores(cls, num_workers: int, cores: int) -> 'WorkerLayout':
    """The layout for `config.data.num_workers` (-1: from `cores`, see the module docstring)."""
    if num_workers < AUTO or cores < 1:
      raise ConfigError(f'config.data.num_workers must be -1 (from the usable cores), 0 (no worker '
                        f'processes) or a number of workers, got {num_workers}')
    workers = max(1, cores - 1) if num_workers == AUTO else num_workers
    threads = min(MAX_THREADS, max(2, math.ceil(2 * cores / max(workers, 1))))
    return cls(workers=workers, threads=threads)

  @classmethod
  def from_config(cls, num_workers: int, cores: Optional[int] = None) -> 'WorkerLayout':
    return cls.for_cores(num_workers, input_cores() if cores is None else cores)


def chunk_size(per_host: int, example_bytes: int, chunk_bytes: Optional[int] = None) -> int:
  """Examples per chunk: the largest divisor of `per_host` whose chunk fits `chunk_bytes` (at least 1)."""
  limit = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, example_bytes))
  return max(d for d in range(1, min(per_host, limit) + 1) if per_host % d == 0)


def memory_in_flight_bytes(layout: WorkerLayout, *, per_host: int, chunk: int, example_bytes: int,
                           device_batches: int = 0) -> dict[str, int]:
  """An upper bound on the bytes of examples the pipeline holds at once, by where they are.

  workers: per worker, each thread's chunk (grain's read buffer holds one per thread), one finished chunk
  in its queue to the training process, one being put there, and one the training process has read
  ahead from it (grain's interleave buffer); without workers, the threads' chunks only. assembling: the
  chunks of one host batch and the stacked batch made of them. device: the batches queued on the
  devices (`config.data.device_prefetch`; device memory on accelerators).
  """
  chunk_bytes = chunk * example_bytes
  batch_bytes = per_host * example_bytes
  per_worker = (layout.threads + 3) if layout.workers else layout.threads
  return {'workers': max(1, layout.workers) * per_worker * chunk_bytes,
          'assembling': 2 * batch_bytes, 'device': device_batches * batch_bytes}


class HostBatchIterator(grain.DatasetIterator):
  """Host batches stacked from `chunks_per_batch` consecutive elements of `chunks`, resumable exactly.

  Its state counts the host batches handed out ({'next_batch': k}); restoring it restarts the workers at
  chunk k * chunks_per_batch, so the state does not depend on the worker layout. Workers start at the
  first `next` (or `start_prefetch`), after any restore. With `num_batches` it stops after that many
  batches and shuts its workers down.
  """

  def __init__(self, chunks: grain.MapDataset, *, chunks_per_batch: int, layout: WorkerLayout,
               to_host_batch: Callable[[Any], Any], num_batches: Optional[int] = None):
    super().__init__()
    self._chunks = chunks
    self._chunks_per_batch = chunks_per_batch
    self._layout = layout
    self._to_host_batch = to_host_batch
    self._num_batches = num_batches
    self._next_batch = 0
    self._running: Optional[grain.DatasetIterator] = None

  def _start(self) -> grain.DatasetIterator:
    remaining = self._chunks[self._next_batch * self._chunks_per_batch:]
    # A buffer of one chunk per thread: every thread busy, nothing queued beyond that.
    dataset = remaining.to_iter_dataset(grain.ReadOptions(
        num_threads=self._layout.threads, prefetch_buffer_size=self._layout.threads))
    if self._layout.workers:
      _allow_grain_multiprocessing()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._layout.workers, per_worker_buffer_size=1))
    dataset = dataset.batch(self._chunks_per_batch, drop_remainder=True).map(self._to_host_batch)
    return iter(dataset)

  def __next__(self):
    self._assert_not_closed()
    if self._num_batches is not None and self._next_batch >= self._num_batches:
      self._stop()
      raise StopIteration
    if self._running is None:
      self._running = self._start()
    batch = next(self._running)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'next_batch': self._next_batch}

  def set_state(self, state: dict[str, Any]) -> None:
    self._stop()
    self._next_batch = batches_consumed(state)

  def start_prefetch(self) -> None:
    if self._running is None and (self._num_batches is None or self._next_batch < self._num_batches):
      self._running = self._start()

  def _stop(self) -> None:
    if self._running is not None:
      self._running.close()
      self._running = None

  def close(self) -> None:
    self._stop()
    super().close()

  def __str__(self) -> str:
    return (f'HostBatchIterator(chunks_per_batch={self._chunks_per_batch}, workers={self._layout.workers}, '
            f'threads={self._layout.threads})')


def batches_consumed(state: dict[str, Any]) -> int:
  """Host batches handed out by the iterator whose state this is; also reads earlier versions' states.

  Before chunking, one grain element was one host batch: a single-process state {'next_index': k}, or a
  worker-process state whose per-worker positions add up to the batches handed out.
  """
  if 'next_batch' in state:
    return int(state['next_batch'])
  if 'next_index' in state:
    return int(state['next_index'])
  if 'iterators_in_use_states' in state:
    return sum(int(worker['next_index']) for worker in state['iterators_in_use_states'])
  raise ConfigError(f'the saved input pipeline position {state!r} is not one this version can read')


def _allow_grain_multiprocessing() -> None:
  # grain's worker processes read absl flags; outside `app.run` (tests, notebooks) nothing has
  # parsed them and grain would fail with UnparsedFlagAccessError.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
