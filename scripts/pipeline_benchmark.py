"""The input pipeline timed as training runs it: `python -m scripts.benchmark input --workers N`.

`run` builds `nfnets.data.pipeline.make_train_iterator` (or `make_eval_iterator`) with
`config.data.num_workers = N` over given JPEGs on one host with one device, takes the first batch
(which pays for starting the workers), then counts batches for a time budget. Besides the wall-clock
rate it reads the CPU seconds this process and its worker processes used meanwhile (Linux's /proc):
examples per CPU-second is the rate per busy core, which other processes competing for the cores lower
far less than the wall-clock rate. It also samples the total size of /dev/shm, where grain's workers
put the chunks they hand over.
"""
import glob
import os
import time
from typing import Any, Dict, Sequence

import ml_collections

from nfnets.data import pipeline
from nfnets.data import workers as workers_lib


class CyclingSource:
  """`length` examples {'image': JPEG bytes, 'label': int} cycling through `jpegs` and `num_classes`."""

  def __init__(self, jpegs: Sequence[bytes], length: int, num_classes: int):
    self._jpegs, self._length, self._num_classes = list(jpegs), length, num_classes

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Dict[str, Any]:
    if not 0 <= index < self._length:
      raise IndexError(index)
    return {'image': self._jpegs[index % len(self._jpegs)], 'label': index % self._num_classes}


def shared_memory_bytes() -> int:
  """Total size of the files in /dev/shm (0 where there is none)."""
  total = 0
  for entry in os.scandir('/dev/shm') if os.path.isdir('/dev/shm') else ():
    try:
      total += entry.stat().st_size
    except OSError:  # freed while listing
      pass
  return total


def process_tree_cpu_seconds() -> float:
  """CPU seconds used so far by this process and its live descendants (the workers; Linux's /proc)."""
  ticks = os.sysconf('SC_CLK_TCK')
  total = sum(os.times()[:2])
  pending = [os.getpid()]
  while pending:
    pid = pending.pop()
    for children in glob.glob(f'/proc/{pid}/task/*/children'):
      try:
        with open(children) as f:
          kids = f.read().split()
      except OSError:
        continue
      for kid in kids:
        try:
          with open(f'/proc/{kid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        except OSError:  # ended meanwhile
          continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime and stime (stat's fields 14, 15)
        pending.append(int(kid))
  return total


def run(data_config: ml_collections.ConfigDict, jpegs: Sequence[bytes], *, workers: int, batch_size: int,
        seconds: float, seed: int, num_classes: int, eval_pipeline: bool = False,
        min_train_examples: int = 0) -> Dict[str, Any]:
  """Times the pipeline of `data_config` with `workers` worker processes; returns the report's fields."""
  data = data_config.copy_and_resolve_references()
  data.num_workers = workers
  layout = workers_lib.WorkerLayout.from_config(workers)
  shared_before = shared_memory_bytes()
  host = dict(global_batch_size=batch_size, process_index=0, process_count=1, local_device_count=1)
  if eval_pipeline:
    # Finite, with far more batches than any realistic rate gets through in the budget.
    iterator = pipeline.make_eval_iterator(
        data, source=CyclingSource(jpegs, batch_size * 100_000, num_classes), **host)
    example_bytes = pipeline.eval_example_bytes(data.eval_resolution)
  else:
    source = CyclingSource(jpegs, max(len(jpegs), min_train_examples), num_classes)
    iterator = pipeline.make_train_iterator(data, seed=seed, num_classes=num_classes, source=source, **host)
    example_bytes = pipeline.train_example_bytes(data.train_resolution, num_classes)
  try:
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter()
    cpu_start = process_tree_cpu_seconds()
    batches, shared_peak = 0, 0
    while True:
      next(iterator)
      batches += 1
      shared_peak = max(shared_peak, shared_memory_bytes() - shared_before)
      elapsed = time.perf_counter() - first
      if elapsed >= seconds:
        break
    cpu_seconds = process_tree_cpu_seconds() - cpu_start
  finally:
    iterator.close()
  cores = len(os.sched_getaffinity(0))
  chunk = workers_lib.chunk_size(batch_size, example_bytes)
  examples = batches * batch_size
  return {
      'eval_resolution': data.eval_resolution,
      'workers': layout.workers,
      'threads_per_worker': layout.threads,
      'cores': cores,
      'batch_size': batch_size,
      'chunk_size': chunk,
      'first_batch_s': round(first - start, 2),
      'timed_batches': batches,
      'examples_per_s': round(examples / elapsed, 1),
      'examples_per_s_per_core': round(examples / elapsed / min(max(layout.workers, 1), cores), 1),
      'cpu_seconds': round(cpu_seconds, 2),
      'cores_busy': round(cpu_seconds / elapsed, 2),
      'examples_per_cpu_s': round(examples / cpu_seconds, 1) if cpu_seconds > 0 else None,
      'memory_in_flight_bound_bytes': workers_lib.memory_in_flight_bytes(
          layout, per_host=batch_size, chunk=chunk, example_bytes=example_bytes),
      'shared_memory_peak_bytes': shared_peak,
      'load_average_1min': round(os.getloadavg()[0], 1),  # other processes' demand on the cores
  }
