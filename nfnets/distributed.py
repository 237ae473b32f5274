"""Multi-device and multi-host plumbing: start-up, replication across local devices, host identity.

Everything else in the library is written for one host's view (its local devices and its data shard);
these helpers are the only place that knows how arrays are laid out across devices.
"""
import collections
import os
import socket
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nfnets.errors import ConfigError

# The name of the device axis: what the train and eval steps are pmapped over, what their collectives (and
# the batch-normalised baseline's cross-device statistics) reduce over.
AXIS_NAME = 'batch'

# How `--local_device_ids` names the two layouts besides an explicit list.
AUTO = 'auto'  # JAX's choice: under SLURM or Open MPI one GPU per process, the one at its local rank
ALL = 'all'    # every GPU the process sees: one process per node, or one GPU bound to each task by the launcher


class _Launcher(NamedTuple):
  required: tuple[str, ...]  # all present: JAX detects this launcher (jax/_src/clusters/)
  process_count: str         # the run's number of processes
  local_rank: str            # the process's index on its node, which JAX turns into its one GPU
  per_node: str              # the number of processes on the node (SLURM: per node, e.g. '8(x4)')


# The launchers whose local rank JAX turns into a GPU id, in JAX's order of detection.
_LAUNCHERS = {
    'ompi': _Launcher(('OMPI_MCA_orte_hnp_uri',), 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_RANK',
                      'OMPI_COMM_WORLD_LOCAL_SIZE'),
    'slurm': _Launcher(('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID'),
                       'SLURM_NTASKS', 'SLURM_LOCALID', 'SLURM_STEP_TASKS_PER_NODE'),
}


def parse_local_device_ids(spec: str) -> Optional[list[int]]:
  """`--local_device_ids` as `jax.distributed.initialize` takes it: 'auto' -> None, 'all' -> [], '0,1' -> [0, 1].

  An empty list leaves every device visible while JAX still detects the coordinator, process count and id
  (it only restricts the visible GPUs for a non-empty list).
  """
  spec = spec.strip()
  if spec == AUTO:
    return None
  if spec == ALL:
    return []
  try:
    ids = [int(part) for part in spec.split(',')]
  except ValueError:
    raise ConfigError(f'--local_device_ids must be {AUTO!r}, {ALL!r} or GPU ids such as 0,1,2,3; '
                      f'got {spec!r}') from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ConfigError(f'--local_device_ids must list distinct non-negative GPU ids; got {spec!r}')
  return ids


def _detected_launcher(cluster_detection_method: Optional[str]) -> Optional[str]:
  """The launcher JAX will take its local rank from, in JAX's order of detection (Open MPI, then SLURM)."""
  if cluster_detection_method is not None:
    return cluster_detection_method if cluster_detection_method in _LAUNCHERS else None
  for name, launcher in _LAUNCHERS.items():
    if all(var in os.environ for var in launcher.required):
      return name
  return None


def launched_process_count() -> int:
  """How many processes `srun` or `mpirun` started for this step (1 when started otherwise).

  A SLURM batch script itself is not counted: JAX does not detect it either (it has no SLURM_STEP_NODELIST).
  """
  for name, launcher in _LAUNCHERS.items():
    count = launcher.process_count
    if all(var in os.environ for var in launcher.required) if name == 'slurm' else count in os.environ:
      return int(os.environ[count])
  return 1


def _gpu_ids_jax_will_use(local_device_ids: Optional[list[int]], cluster_detection_method: Optional[str]
                          ) -> tuple[Optional[list[int]], str, Optional[str]]:
  """The GPU ids JAX will restrict this process to (None: all), where they come from, and the launcher when they
  are its local rank."""
  if local_device_ids is not None:
    return (local_device_ids or None), f'--local_device_ids={",".join(map(str, local_device_ids)) or ALL}', None
  if os.environ.get('JAX_LOCAL_DEVICE_IDS'):
    return [int(i) for i in os.environ['JAX_LOCAL_DEVICE_IDS'].split(',')], 'JAX_LOCAL_DEVICE_IDS', None
  launcher = _detected_launcher(cluster_detection_method)
  if cluster_detection_method == 'deactivate' or launcher is None:
    return None, '', None
  rank_var = _LAUNCHERS[launcher].local_rank
  return [int(os.environ[rank_var])], f'the local rank ({rank_var}) under --local_device_ids={AUTO}', launcher


def _processes_on_this_node(launcher: str) -> Optional[int]:
  """The launcher's count of processes per node, where every node runs the same number (else None)."""
  value = os.environ.get(_LAUNCHERS[launcher].per_node, '')
  try:
    counts = {int(entry.split('(')[0]) for entry in value.split(',') if entry.strip()}  # SLURM: '8(x4)' or '8,8'
  except ValueError:
    return None
  return counts.pop() if len(counts) == 1 else None


def _jax_platforms() -> Optional[str]:
  """JAX_PLATFORMS as JAX read it, e.g. 'cpu' for a run that leaves the GPUs alone; None: JAX's own choice."""
  return jax.config.jax_platforms


def check_gpu_ids(local_device_ids: Optional[list[int]], cluster_detection_method: Optional[str]) -> None:
  """Refuses GPU choices that cannot work or leave GPUs idle, before JAX starts.

  A launcher that binds one GPU to each task (e.g. `srun --gpus-per-task=1`) makes that GPU the process's
  device 0, while JAX's default still asks for the GPU at the process's local rank. And with fewer processes
  on a node than GPUs, JAX's default of one GPU per process leaves the others idle (one task per node trains on
  GPU 0 alone).
  """
  ids, origin, launcher = _gpu_ids_jax_will_use(local_device_ids, cluster_detection_method)
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  platforms = _jax_platforms()
  if (ids is None or visible is None or visible.strip() in ('', 'all')
      or (platforms and not {'cuda', 'gpu'} & set(platforms.split(',')))):
    return
  count = len(visible.split(','))
  if max(ids) >= count:
    raise ConfigError(f'GPU id(s) {",".join(map(str, ids))} from {origin} are not among the {count} GPU(s) this '
                      f'process sees (CUDA_VISIBLE_DEVICES={visible}); when the launcher gives each process its '
                      f'own GPU(s), pass --local_device_ids={ALL}')
  on_node = _processes_on_this_node(launcher) if launcher else None
  if on_node is not None and on_node < count:
    raise ConfigError(f'{on_node} process(es) on this node would drive one GPU each of the {count} it has '
                      f'(CUDA_VISIBLE_DEVICES={visible}), leaving {count - on_node} idle: for one process per node '
                      f'pass --local_device_ids={ALL}, or start one process per GPU')


def initialize(enabled: bool, coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: str = AUTO,
               cluster_detection_method: Optional[str] = None) -> None:
  """Joins the multi-process job; a no-op unless `enabled` (refused when a launcher started several processes).

  On TPU pods and under SLURM or Open MPI JAX finds the coordinator, process count and id itself, as it does
  from its own environment variables (JAX_COORDINATOR_ADDRESS, ...); elsewhere pass the three arguments.
  `local_device_ids` ('auto', 'all' or GPU ids, see `parse_local_device_ids`) picks the GPUs this process
  drives: under SLURM and Open MPI JAX's default is the single GPU at the process's local rank, which suits one
  process per GPU only. CPU hosts exchange collectives through gloo, so the same code runs on CPU-only
  machines and in the tests.
  """
  ids = parse_local_device_ids(local_device_ids)
  if not enabled:
    launched = launched_process_count()
    if launched > 1:
      raise ConfigError(f'the launcher started {launched} processes but the run is not distributed: pass '
                        '--config.distributed=True (or start a single process)')
    if ids is not None:
      raise ConfigError('--local_device_ids applies to a multi-process run (--config.distributed=True); a single '
                        'process drives every GPU it sees (choose them with CUDA_VISIBLE_DEVICES)')
    return
  check_gpu_ids(ids, cluster_detection_method)
  if jax.config.jax_cpu_collectives_implementation in (None, 'none', ''):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=ids,
                               cluster_detection_method=cluster_detection_method)
  except (ValueError, TypeError, KeyError) as e:  # raised before any connection: what was given is incomplete
    detail = f'{e} is not set' if isinstance(e, KeyError) else str(e).splitlines()[0]
    raise ConfigError(f'cannot start the multi-process run: {detail} (outside SLURM, Open MPI and TPU pods pass '
                      '--coordinator_address, --num_processes and --process_id)') from None


def layout_line() -> str:
  """This process's place in the run, for the first lines of a log: a run on fewer devices than meant shows."""
  local, everywhere = jax.local_devices(), jax.devices()
  gpus = ''
  if local[0].platform == 'gpu':  # ordinals count from 0 within the GPUs the launcher lets the process see
    gpus = (f', GPU ordinals {",".join(str(d.local_hardware_id) for d in local)} of CUDA_VISIBLE_DEVICES='
            f'{os.environ.get("CUDA_VISIBLE_DEVICES", "(unset: all)")}')
  return (f'process {jax.process_index()} of {jax.process_count()} on {socket.gethostname()}: '
          f'{len(local)} local of {len(everywhere)} devices ({local[0].platform}, {local[0].device_kind}{gpus})')


def check_layout(devices: Sequence = None) -> None:
  """Refuses a run whose processes drive different numbers of devices (their batch shards would not match)."""
  per_process = collections.Counter(d.process_index for d in (jax.devices() if devices is None else devices))
  if len(set(per_process.values())) > 1:
    counts = ', '.join(f'process {p}: {n}' for p, n in sorted(per_process.items()))
    raise ConfigError(f'the processes drive different numbers of devices ({counts}); give every process the '
                      'same number of GPUs (--local_device_ids)')


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


# ---- Collectives, for code running inside a pmap over AXIS_NAME. ----

def axis_is_bound(axis_name: str) -> bool:
  """Whether a collective over `axis_name` is possible here (we are inside a pmap over that axis)."""
  try:
    jax.lax.axis_index(axis_name)
  except NameError:
    return False
  return True


def device_mean(tree, axis_name: str):
  """`pmean` over `axis_name`, skipped on an axis of one device (XLA would still copy every leaf)."""
  if jax.lax.axis_size(axis_name) == 1:
    return tree
  return jax.lax.pmean(tree, axis_name)


def agreed(flag: jax.Array, axis_name: str) -> jax.Array:
  """`flag` held on every device of `axis_name` (a boolean scalar).

  The devices already agree when the flag comes from averaged values. The collective matters to the
  compiler: its result is one materialised scalar, where XLA CPU otherwise copied the hundreds of
  per-leaf reductions computing the flag into the fusion of every select consuming it (a program
  quadratic in the number of leaves: the F0 step compiled in minutes).
  """
  return jax.lax.pmin(flag.astype(jnp.int32), axis_name) > 0
