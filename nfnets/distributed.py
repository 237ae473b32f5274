"""Multi-device and multi-host plumbing: start-up, replication across local devices, host identity.

Everything else in the library is written for one host's view (its local devices and its data shard);
these helpers are the only place that knows how arrays are laid out across devices.
"""
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize(enabled: bool, coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Joins the multi-process job; a no-op unless `enabled`.

  On TPU pods (and clusters JAX knows, e.g. SLURM) JAX finds the coordinator itself, as it does from its own
  environment variables (JAX_COORDINATOR_ADDRESS, ...); elsewhere pass the three arguments. CPU hosts
  exchange collectives through gloo, so the same code runs on CPU-only machines and in the tests.
  """
  if not enabled:
    return
  if jax.config.jax_cpu_collectives_implementation in (None, 'none', ''):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def is_primary_host() -> bool:
  return jax.process_index() == 0


def replicate(tree, axis_name: str, devices=None):
  """Copies a host (or single-device) tree onto every local device, stacked on a leading device axis.

  The result is what `jax.pmap(..., axis_name=axis_name)` takes for an argument that is the same on every
  device.
  """
  devices = list(devices or jax.local_devices())
  return shard(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), tree),
               axis_name, devices)


def shard(tree, axis_name: str, devices=None):
  """Places each leaf's leading axis (one entry per local device) across the local devices.

  The result is what `jax.pmap(..., axis_name=axis_name)` takes for a per-device argument (e.g. a batch
  shaped [local_devices, per_device, ...]). The mesh axis must carry the pmap's axis name: pmap's outputs
  are laid out on such a mesh, and an input laid out on any other would make the second call compile the
  whole step again.
  """
  devices = list(devices or jax.local_devices())
  sharding = NamedSharding(Mesh(np.array(devices), (axis_name,)), PartitionSpec(axis_name))
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def unreplicate(tree):
  """This host's copy of a replicated tree, as numpy arrays (all device copies are equal after a pmapped step).

  Reads the first local shard's buffer; indexing the global array instead would run one gather per leaf.
  """
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
