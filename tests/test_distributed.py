"""Multi-process start-up without starting one: what reaches `jax.distributed.initialize` for each GPU layout,
and the one-line refusals of layouts that cannot work (a real 2-process SLURM launch is in test_multiprocess)."""
import os
import types

import jax
import pytest

from nfnets import distributed
from nfnets.errors import ConfigError


@pytest.fixture
def clean_env(monkeypatch):
  """No launcher, no GPU selection: each test sets exactly the variables of the launch it fakes."""
  for name in list(os.environ):
    if name.startswith(('SLURM_', 'OMPI_', 'PMIX_')) or name in ('CUDA_VISIBLE_DEVICES', 'JAX_LOCAL_DEVICE_IDS'):
      monkeypatch.delenv(name)
  monkeypatch.setattr(distributed, '_jax_platforms', lambda: None)  # the suite runs on CPU: pretend GPUs may be used
  return monkeypatch


@pytest.fixture
def jax_initialize(monkeypatch):
  """Records the arguments instead of joining a run (this process's backends are already up)."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)  # keep this process's CPU collectives
  return calls


def _srun_task(env, local_id, ntasks=2):
  """The variables `srun` sets (those JAX reads) for task `local_id` of a one-node step."""
  for name, value in {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': str(ntasks), 'SLURM_PROCID': str(local_id),
                      'SLURM_LOCALID': str(local_id), 'SLURM_STEP_NODELIST': 'gpu-node1'}.items():
    env.setenv(name, value)


@pytest.mark.parametrize('spec, expected', [('auto', None), ('all', []), ('3', [3]), (' 0,1,2,3 ', [0, 1, 2, 3])])
def test_local_device_ids_flag(spec, expected):
  assert distributed.parse_local_device_ids(spec) == expected


@pytest.mark.parametrize('spec', ['gpu0', '0,0', '-1', '', 'ALL'])
def test_bad_local_device_ids_are_refused(spec):
  with pytest.raises(ConfigError, match='--local_device_ids'):
    distributed.parse_local_device_ids(spec)


def test_each_layout_reaches_jax(clean_env, jax_initialize):
  _srun_task(clean_env, 1)
  distributed.initialize(True)  # one process per GPU: JAX picks the GPU at the local rank
  distributed.initialize(True, local_device_ids='all', cluster_detection_method='slurm')  # one per node
  distributed.initialize(True, '10.0.0.1:1234', 2, 1, local_device_ids='0,1')
  assert [(c['local_device_ids'], c['cluster_detection_method']) for c in jax_initialize] == [
      (None, None), ([], 'slurm'), ([0, 1], None)]
  assert jax_initialize[2]['coordinator_address'] == '10.0.0.1:1234' and jax_initialize[2]['process_id'] == 1


def test_jax_leaves_every_gpu_visible_for_all_and_detects_the_rest(clean_env):
  """What `--local_device_ids=all` relies on, read from JAX's own detection (jax/_src/clusters): an empty list
  is kept (no GPU restriction) while the coordinator, count and id still come from SLURM."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  _srun_task(clean_env, 1)
  clean_env.setenv('JAX_COORDINATOR_PORT', '4321')
  detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
  assert detect(None, None, None, [], None, 300) == ('gpu-node1:4321', 2, 1, [])
  assert detect(None, None, None, None, None, 300)[3] == [1]  # the default: the GPU at the local rank


def test_a_gpu_the_launcher_did_not_give_is_refused_before_jax_starts(clean_env, jax_initialize):
  # srun --gpus-per-task=1: task 3 sees its one GPU as device 0, but JAX would ask for device 3.
  _srun_task(clean_env, 3, ntasks=4)
  clean_env.setenv('CUDA_VISIBLE_DEVICES', '3')
  with pytest.raises(ConfigError, match=r'GPU id\(s\) 3 from the local rank \(SLURM_LOCALID\).*'
                                        r'CUDA_VISIBLE_DEVICES=3.*--local_device_ids=all'):
    distributed.initialize(True)
  with pytest.raises(ConfigError, match='GPU id.* 2,4 from --local_device_ids=2,4 .* 4 GPU'):
    clean_env.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,3')
    distributed.initialize(True, local_device_ids='2,4')
  assert not jax_initialize
  distributed.initialize(True)  # all four GPUs visible to each task: local rank 3 is one of them
  clean_env.setattr(distributed, '_jax_platforms', lambda: 'cpu')  # a CPU run ignores the GPUs
  distributed.initialize(True, local_device_ids='2,4')
  clean_env.setenv('CUDA_VISIBLE_DEVICES', '3')
  distributed.initialize(True, local_device_ids='all')
  assert len(jax_initialize) == 3


def test_one_task_per_node_on_jax_default_is_refused_as_it_would_leave_gpus_idle(clean_env, jax_initialize):
  # srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8: JAX's default gives each process GPU 0 only.
  _srun_task(clean_env, 0, ntasks=4)
  clean_env.setenv('SLURM_STEP_TASKS_PER_NODE', '1(x4)')
  clean_env.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,3,4,5,6,7')
  with pytest.raises(ConfigError, match=r'^1 process\(es\) on this node would drive one GPU each of the 8 it has '
                                        r'.* leaving 7 idle: for one process per node pass --local_device_ids=all'):
    distributed.initialize(True)
  distributed.initialize(True, local_device_ids='all')
  distributed.initialize(True, local_device_ids='0')  # one GPU on purpose
  for per_node in ('8(x4)', '8,8,8,8', '8,7'):  # one process per GPU; nodes that differ are not judged
    _srun_task(clean_env, 3, ntasks=32)
    clean_env.setenv('SLURM_STEP_TASKS_PER_NODE', per_node)
    distributed.initialize(True)
  assert [c['local_device_ids'] for c in jax_initialize] == [[], [0], None, None, None]


def test_open_mpi_local_rank_is_checked_too(clean_env, jax_initialize):
  for name, value in {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.0.0.1:34911', 'OMPI_COMM_WORLD_SIZE': '2',
                      'OMPI_COMM_WORLD_RANK': '1', 'OMPI_COMM_WORLD_LOCAL_RANK': '1',
                      'CUDA_VISIBLE_DEVICES': '1'}.items():
    clean_env.setenv(name, value)
  with pytest.raises(ConfigError, match=r'OMPI_COMM_WORLD_LOCAL_RANK'):
    distributed.initialize(True)
  clean_env.setenv('OMPI_COMM_WORLD_LOCAL_SIZE', '2')
  clean_env.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,3')
  with pytest.raises(ConfigError, match='2 process.* of the 4 it has'):
    distributed.initialize(True)
  distributed.initialize(True, cluster_detection_method='deactivate', coordinator_address='10.0.0.1:1',
                         num_processes=2, process_id=1)  # no detection: JAX restricts nothing
  assert len(jax_initialize) == 1


def test_a_multi_task_launch_that_is_not_distributed_is_refused(clean_env, jax_initialize):
  distributed.initialize(False)  # started by hand
  clean_env.setenv('SLURM_JOB_ID', '7')
  clean_env.setenv('SLURM_NTASKS', '8')
  clean_env.setenv('SLURM_PROCID', '0')
  clean_env.setenv('SLURM_LOCALID', '0')
  distributed.initialize(False)  # a batch script's own environment, not an srun step: one process
  clean_env.setenv('SLURM_STEP_NODELIST', 'gpu-node[1-2]')
  with pytest.raises(ConfigError, match='the launcher started 8 processes .* --config.distributed=True'):
    distributed.initialize(False)
  assert not jax_initialize


def test_mpirun_without_distributed_is_refused(clean_env, jax_initialize):
  clean_env.setenv('OMPI_COMM_WORLD_SIZE', '16')
  with pytest.raises(ConfigError, match='started 16 processes'):
    distributed.initialize(False)


def test_gpu_ids_without_a_multi_process_run_are_refused(clean_env, jax_initialize):
  with pytest.raises(ConfigError, match='--local_device_ids applies to a multi-process run'):
    distributed.initialize(False, local_device_ids='all')


def test_an_incomplete_start_is_one_line(clean_env, monkeypatch):
  def refuse(**kwargs):
    raise ValueError('coordinator_address should be defined.')
  monkeypatch.setattr(jax.distributed, 'initialize', refuse)
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)
  with pytest.raises(ConfigError, match='cannot start the multi-process run: coordinator_address should be '
                                        'defined. .*--coordinator_address'):
    distributed.initialize(True)


def test_processes_with_different_device_counts_are_refused():
  devices = lambda *owners: [types.SimpleNamespace(process_index=p) for p in owners]
  distributed.check_layout(devices(0, 0, 1, 1))
  with pytest.raises(ConfigError, match=r'different numbers of devices \(process 0: 8, process 1: 1\)'):
    distributed.check_layout(devices(*[0] * 8, 1))


def test_layout_line_names_the_process_and_its_devices():
  assert distributed.layout_line().endswith(f': {jax.local_device_count()} local of {jax.device_count()} devices '
                                            '(cpu, cpu)')
  assert distributed.layout_line().startswith('process 0 of 1 on ')


def test_layout_line_on_gpus_shows_which_ones(monkeypatch):
  gpus = [types.SimpleNamespace(platform='gpu', device_kind='NVIDIA H100 80GB HBM3', local_hardware_id=i,
                                process_index=0) for i in range(2)]
  monkeypatch.setattr(jax, 'local_devices', lambda: gpus)
  monkeypatch.setattr(jax, 'devices', lambda: gpus * 4)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '6,7')
  assert distributed.layout_line().endswith(': 2 local of 8 devices (gpu, NVIDIA H100 80GB HBM3, GPU ordinals 0,1 '
                                            'of CUDA_VISIBLE_DEVICES=6,7)')
