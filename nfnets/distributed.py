"""Multi-device and multi-host plumbing: start-up, replication across local devices, host identity.

Everything else in the library is written for one host's view (its local devices and its data shard);
these helpers are the only place that knows how arrays are laid out across devices.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize(enabled: bool) -> None:
  """Joins the multi-host job (TPU pods discover their peers); a no-op on a single host."""
  if enabled:
    jax.distributed.initialize()


def is_primary_host() -> bool:
  return jax.process_index() == 0


def replicate(tree, axis_name: str, devices=None):
  """Copies a host (or single-device) tree onto every local device, stacked on a leading device axis.

  The result is what `jax.pmap(..., axis_name=axis_name)` takes for an argument that is the same on every
  device. The mesh axis must carry the pmap's axis name: pmap's outputs are laid out on such a mesh, and
  an input laid out on any other would make the second call compile the whole step again.
  """
  devices = list(devices or jax.local_devices())
  sharding = NamedSharding(Mesh(np.array(devices), (axis_name,)), PartitionSpec(axis_name))
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), sharding), tree)


def unreplicate(tree):
  """This host's copy of a replicated tree, as numpy arrays (all device copies are equal after a pmapped step).

  Reads the first local shard's buffer; indexing the global array instead would run one gather per leaf.
  """
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
