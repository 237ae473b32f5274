"""Input workers: sizing from the usable cores and the host's processes, chunks, the memory bound."""
import pytest

from nfnets.data import pipeline
from nfnets.data import workers
from nfnets.errors import ConfigError


@pytest.mark.parametrize('environ, usable, machine, sharing', [
    ({}, 96, 96, 1),
    ({'LOCAL_WORLD_SIZE': '8'}, 96, 96, 8),
    ({'OMPI_COMM_WORLD_LOCAL_SIZE': '4'}, 96, 96, 4),
    ({'SLURM_NTASKS_PER_NODE': '2'}, 96, 96, 2),
    ({'SLURM_NTASKS_PER_NODE': '2(x3)'}, 96, 96, 1),   # not a plain count: ignored
    ({'LOCAL_WORLD_SIZE': '8'}, 12, 96, 1),            # pinned to 12 cores: its own
])
def test_processes_sharing_the_cores(environ, usable, machine, sharing):
  assert workers.processes_sharing_cores(environ, usable, machine) == sharing


def test_input_cores_follow_the_affinity_not_the_machine(monkeypatch):
  monkeypatch.setattr(workers.os, 'cpu_count', lambda: 64)
  monkeypatch.setattr(workers.os, 'sched_getaffinity', lambda pid: set(range(64)))
  assert workers.input_cores({}) == 64
  assert workers.input_cores({'LOCAL_WORLD_SIZE': '8'}) == 8
  monkeypatch.setattr(workers.os, 'sched_getaffinity', lambda pid: {3, 4, 5})
  assert workers.input_cores({'LOCAL_WORLD_SIZE': '8'}) == 3


@pytest.mark.parametrize('num_workers, cores, expected', [
    (-1, 96, (95, 3)),   # one core left to the training loop; two threads per core in all
    (-1, 8, (7, 3)),
    (-1, 2, (1, 4)),
    (-1, 1, (1, 2)),
    (0, 2, (0, 4)),      # threads of the training process only
    (0, 64, (0, 16)),
    (12, 96, (12, 16)),
    (4, 2, (4, 2)),
])
def test_worker_layout(num_workers, cores, expected):
  layout = workers.WorkerLayout.for_cores(num_workers, cores)
  assert (layout.workers, layout.threads) == expected


def test_worker_layout_rejects_negative_counts_other_than_auto():
  with pytest.raises(ConfigError, match='num_workers'):
    workers.WorkerLayout.for_cores(-2, 8)


def test_chunks_divide_the_host_batch_within_the_byte_budget():
  train = pipeline.train_example_bytes(192, 1000)
  assert train == 192 * 192 * 3 + 4000
  assert workers.chunk_size(4096, train) == 64            # 73 would fit 8 MiB; 64 divides 4096
  assert workers.chunk_size(512, pipeline.eval_example_bytes(576)) == 2
  assert workers.chunk_size(7, pipeline.eval_example_bytes(576)) == 1
  assert workers.chunk_size(24, 10) == 24                  # tiny examples: the whole batch


def test_a_4096_image_host_batch_at_192_holds_a_few_gb_not_tens():
  # A 96-core host, one training process: 95 workers, 3 threads each.
  layout = workers.WorkerLayout.for_cores(-1, 96)
  example = pipeline.train_example_bytes(192, 1000)
  memory = workers.memory_in_flight_bytes(layout, per_host=4096, chunk=64, example_bytes=example,
                                          device_batches=2)
  assert memory['workers'] == 95 * (3 + 3) * 64 * example
  assert memory['assembling'] == 2 * 4096 * example
  assert sum(memory.values()) < 7e9  # 6.06 GB; a host batch per thread of 8 workers x 16 threads was 64 GB
  threads_only = workers.WorkerLayout.for_cores(0, 8)
  assert workers.memory_in_flight_bytes(threads_only, per_host=64, chunk=8, example_bytes=10)['workers'] == 16 * 80
