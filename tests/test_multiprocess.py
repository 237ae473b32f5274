"""A real pod run in miniature: 2 processes on localhost (jax.distributed, gloo CPU collectives, 1 device each)
train the tiny config into a gs:// workdir served by a fake Cloud Storage, are preempted at different moments,
resume as the 2 tasks of a (faked) SLURM step, and end exactly where 1 process with 2 devices ends; nothing is
written to the local disk. A SLURM step of 2 processes with 2 devices each joins, and refuses to run without
--workdir.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nfnets import checkpoint
from nfnets import trainer
from nfnets.data import digits
from tests import fake_gcs
from tests import tiny_setup
from tests.helpers import REPO_ROOT
from tests.helpers import free_port

BUCKET = 'pod-bucket'
WORKDIR = f'gs://{BUCKET}/tiny'


def _launch(env: dict[str, str], cwd: str) -> list[subprocess.Popen]:
  """2 processes told their peers by flags."""
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, '-m', 'experiments.train', *tiny_setup.command_line_overrides(), '--workdir', WORKDIR,
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _srun(env: dict[str, str], cwd: str, *args: str, stderr=subprocess.STDOUT) -> list[subprocess.Popen]:
  """The 2 tasks of a one-node SLURM step: the processes find their peers in the variables JAX reads."""
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, '-m', 'experiments.train', *args, '--config.distributed=True'], cwd=cwd,
      env=dict(env, SLURM_JOB_ID='4242', SLURM_NTASKS='2', SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
               SLURM_STEP_NODELIST='localhost', SLURM_STEP_NUM_NODES='1', SLURM_STEP_NUM_TASKS='2',
               # JAX derives the port from the job id; a free one keeps parallel test runs apart.
               JAX_COORDINATOR_PORT=str(port)),
      stdout=subprocess.PIPE, stderr=stderr, text=True) for i in range(2)]


def _wait(processes, timeout=600) -> list[str]:
  outputs = []
  for process in processes:
    out, _ = process.communicate(timeout=timeout)
    outputs.append(out)
  return outputs


def _read_until(process, marker: str, timeout=600) -> str:
  seen, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = process.stdout.readline()
    if not line:
      break
    seen.append(line)
    if marker in line:
      return ''.join(seen)
  raise AssertionError(f'{marker!r} never printed:\n{"".join(seen)[-3000:]}')


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """1 process x 2 simulated devices, uninterrupted, on the local disk."""
  workdir = tmp_path_factory.mktemp('one_process')
  results = trainer.train_and_evaluate(tiny_setup.tiny_config(), workdir)
  return checkpoint.read(workdir).weight_sets, results


@pytest.mark.slow
def test_two_processes_on_gcs_survive_preemption_and_match_one_process(reference_run, tmp_path):
  digits.prepare()  # the dataset is local input, prepared once, not part of the run's output
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  with fake_gcs.fake_gcs(BUCKET) as gcs_env:
    env = dict(os.environ, **gcs_env, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT,
               # No persistent compilation cache: on jax 0.12.1 two CPU processes that load their train step
               # from a warm cache hang in its first collective (a cold cache works; jax 0.10.2 works either way).
               JAX_ENABLE_COMPILATION_CACHE='false',
               # One CPU device per process; no LLVM backend optimisation, as in the rest of the suite.
               XLA_FLAGS='--xla_backend_optimization_level=0')
    first = _launch(env, str(cwd))
    try:
      # TPU VMs of a slice receive SIGTERM at different moments: one now, the other half a second later.
      _read_until(first[0], 'step 5/')
      first[0].send_signal(signal.SIGTERM)
      time.sleep(0.5)
      if first[1].poll() is None:
        first[1].send_signal(signal.SIGTERM)
      outputs = _wait(first)
    finally:
      for process in first:
        process.kill()
    assert [p.returncode for p in first] == [0, 0], outputs
    stopped = [line for line in outputs[0].splitlines() if 'checkpointed step' in line]
    assert len(stopped) == 1, outputs[0]
    stop_step = int(stopped[0].split('checkpointed step ')[1].split()[0])
    assert 5 <= stop_step < tiny_setup.NUM_STEPS
    objects = fake_gcs.list_objects(gcs_env, BUCKET)
    # One common checkpoint of the stop step holds both processes' data positions.
    for i in range(2):
      assert f'tiny/checkpoints/{stop_step}/data/process_{i}-of-2.json' in objects

    second = _srun(env, str(cwd), *tiny_setup.command_line_overrides(), '--workdir', WORKDIR)
    try:
      outputs = _wait(second)
    finally:
      for process in second:
        process.kill()
    assert [p.returncode for p in second] == [0, 0], outputs
    for i in range(2):
      assert f'process {i} of 2 on {socket.gethostname()}: 1 local of 2 devices (cpu' in outputs[i], outputs[i]
    assert f'resumed from step {stop_step}' in outputs[0]
    final = [line for line in outputs[0].splitlines() if line.startswith('final:')]
    # Each process evaluates its half of the split; every example is counted exactly once.
    assert len(final) == 1 and f'| {tiny_setup.DIGITS_TEST_EXAMPLES} examples' in final[0], outputs[0]
    assert not any(line.startswith('final:') for line in outputs[1].splitlines())  # only process 0 prints

    objects = fake_gcs.list_objects(gcs_env, BUCKET)
    assert 'tiny/config.json' in objects and 'tiny/metrics.jsonl' in objects
    assert any(name.startswith('tiny/tb/events.out.tfevents') for name in objects)
    assert not any('.tmp-' in name for name in objects)
    # Only process 0 logs: one line per logged step, none doubled, continued across the resume.
    logged_steps = [row['step'] for row in map(json.loads, _read_object(gcs_env, 'tiny/metrics.jsonl'))
                    if 'train/loss' in row]
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == tiny_setup.NUM_STEPS
    assert json.loads(''.join(_read_object(gcs_env, 'tiny/config.json')))['train']['num_steps'] == (
        tiny_setup.NUM_STEPS)

    os.environ.update(gcs_env)
    try:
      resumed = checkpoint.read(WORKDIR).weight_sets
    finally:
      for key in gcs_env:
        os.environ.pop(key)
  assert list(cwd.iterdir()) == []  # nothing was written to the local disk

  expected, results = reference_run
  assert set(resumed) == set(expected) == {'', 'ema_'}
  for prefix in expected:
    for a, b in zip(jax.tree.leaves(expected[prefix]), jax.tree.leaves(resumed[prefix])):
      np.testing.assert_array_equal(a, b)
  assert f'top-1 {100 * results["top1"]:.2f}%' in final[0]


def test_a_slurm_step_joins_with_two_devices_per_process_and_needs_a_workdir(tmp_path):
  """One process per node driving all its devices: each of the 2 tasks sees 2 (CPU) devices, 4 in the run."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0')
  tasks = _srun(env, str(tmp_path), '--local_device_ids=all', stderr=subprocess.PIPE)
  try:
    outputs = [task.communicate(timeout=300) for task in tasks]
  finally:
    for task in tasks:
      task.kill()
  for i, (out, err) in enumerate(outputs):
    assert tasks[i].returncode == 1, (out, err)
    # Both joined (the count of 4 devices spans both processes) before the missing --workdir was refused.
    assert out.splitlines() == [f'process {i} of 2 on {socket.gethostname()}: 2 local of 4 devices (cpu, cpu)']
    assert err == 'error: a multi-process run needs --workdir (each process would invent a runs/<config>-<time> ' \
                  'of its own)\n'
  assert list(tmp_path.iterdir()) == []  # no runs/ folder of any process


def _read_object(env, name):
  import urllib.parse  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  url = f'{env["STORAGE_EMULATOR_HOST"]}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe="")}?alt=media'
  return urllib.request.urlopen(url, timeout=10).read().decode().splitlines(keepends=True)
