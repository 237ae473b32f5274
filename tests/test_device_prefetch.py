"""Device prefetch: the host's batches, in order, on the devices, with the step's position checkpointed."""
import grain
import jax
import numpy as np
import pytest
from etils import epath

from nfnets import distributed
from nfnets.data import device_prefetch


def _host_iterator():
  """Batches {'x': [local_devices, 3]} holding their index, from a resumable grain iterator."""
  devices = jax.local_device_count()
  dataset = grain.MapDataset.range(1000).map(lambda i: {'x': np.full((devices, 3), i, np.int32)})
  return iter(dataset.to_iter_dataset())


def _prefetched(size=2):
  return device_prefetch.DevicePrefetch(_host_iterator(), size, distributed.AXIS_NAME)


def test_yields_the_host_batches_in_order_spread_over_the_local_devices():
  assert jax.local_device_count() == 2, 'conftest should simulate 2 CPU devices'
  batches = [b for _, b in zip(range(4), _prefetched())]
  assert [int(b['x'][0, 0]) for b in batches] == [0, 1, 2, 3]
  batch = batches[-1]['x']
  assert isinstance(batch, jax.Array) and batch.sharding.device_set == set(jax.local_devices())
  assert [shard.data.shape for shard in batch.addressable_shards] == [(1, 3), (1, 3)]
  # What the pmapped step takes, with no copy back to the host.
  doubled = jax.pmap(lambda x: 2 * x, axis_name=distributed.AXIS_NAME)(batch)
  np.testing.assert_array_equal(doubled, np.full((2, 3), 6))


@pytest.mark.parametrize('size', [1, 3])
def test_the_state_is_the_position_of_the_next_batch_the_caller_gets_not_of_the_queue(size):
  prefetched, host = _prefetched(size), _host_iterator()
  for _ in range(5):
    next(prefetched)
    next(host)
  # The prefetcher has read `size` batches further; its state is still that of the host after 5.
  assert prefetched.get_state() == device_prefetch.DevicePrefetch(host, size, 'batch').get_state()
  resumed = _prefetched(size)
  resumed.set_state(prefetched.get_state())
  assert [int(next(resumed)['x'][0, 0]) for _ in range(3)] == [5, 6, 7]
  assert [int(next(prefetched)['x'][0, 0]) for _ in range(3)] == [5, 6, 7]


def test_grain_checkpoints_write_the_host_iterators_own_file(tmp_path):
  prefetched, host = _prefetched(), _host_iterator()
  for _ in range(4):
    next(prefetched)
    next(host)
  handler = grain.checkpoint.CheckpointHandler()
  for name, iterator in (('prefetched', prefetched), ('host', host)):
    (tmp_path / name).mkdir()
    handler.save(epath.Path(tmp_path / name), iterator)
  files = [sorted((tmp_path / name).iterdir()) for name in ('prefetched', 'host')]
  assert [f.name for f in files[0]] == [f.name for f in files[1]]
  assert [f.read_text() for f in files[0]] == [f.read_text() for f in files[1]]
  restored = handler.restore(epath.Path(tmp_path / 'prefetched'), _prefetched())
  assert int(next(restored)['x'][0, 0]) == 4


def test_a_finite_host_iterator_ends_after_its_last_batch():
  devices = jax.local_device_count()
  host = iter(grain.MapDataset.range(5).map(lambda i: {'x': np.full((devices, 3), i)}).to_iter_dataset())
  prefetched = device_prefetch.DevicePrefetch(host, 3, distributed.AXIS_NAME)
  assert [int(b['x'][0, 0]) for b in prefetched] == [0, 1, 2, 3, 4]
  with pytest.raises(StopIteration):
    next(prefetched)


def test_a_queue_of_no_batches_is_refused():
  with pytest.raises(ValueError, match='at least 1'):
    device_prefetch.DevicePrefetch(_host_iterator(), 0, distributed.AXIS_NAME)
