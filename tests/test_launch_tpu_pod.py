"""The TPU pod launcher: its exact gcloud commands, the worker-side scripts (run here with bash), the
preemption watch with a fake gcloud, and one-line failures. Nothing here calls gcloud."""
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import pytest

from scripts import launch_tpu_pod
from scripts import tpu_pod

ZONE = 'us-central2-b'
WORKDIR = 'gs://bucket/f0'
# Overrides with quotes and spaces must reach experiments.train on the workers exactly as given.
OVERRIDES = ("config.model.name='nfnet'", 'config.data.data_dir=gs://bucket/my data', '--config.seed=3')
EXPECTED_TRAIN_ARGS = ['-m', 'experiments.train', '--config=configs/nfnet.py:F0', f'--workdir={WORKDIR}',
                       '--config.distributed=True', "--config.model.name='nfnet'",
                       '--config.data.data_dir=gs://bucket/my data', '--config.seed=3']


def _launch(*args, runner=None, sleep=None):
  kwargs = {}
  if runner is not None:
    kwargs['runner'] = runner
  kwargs['sleep'] = sleep or (lambda seconds: None)
  return launch_tpu_pod.main(['launch_tpu_pod', *args], **kwargs)


def _run_args(name, accelerator_type, *extra):
  overrides = [arg for override in OVERRIDES for arg in ('--override', override)]
  return ['run', '--dry-run', '--name', name, '--zone', ZONE, '--accelerator_type', accelerator_type,
          '--config', 'configs/nfnet.py:F0', '--workdir', WORKDIR, '--jax_version', '0.10.2', *overrides, *extra]


def _dry_run_lines(capsys, *args):
  assert _launch(*args) == 0
  return capsys.readouterr().out.splitlines()


def _remote_script(line):
  """The shell script a printed `gcloud ... ssh --command=SCRIPT` line runs on each worker."""
  argv = shlex.split(line)
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'] and '--worker=all' in argv
  [command] = [arg for arg in argv if arg.startswith('--command=')]
  return command[len('--command='):]


@pytest.mark.parametrize('accelerator_type', ['v4-8', 'v4-32'])
def test_run_dry_run_prints_every_gcloud_command(accelerator_type, capsys):
  name = 'nf-f0'
  lines = _dry_run_lines(capsys, *_run_args(name, accelerator_type))
  assert len(lines) == 6
  assert lines[0] == (f'gcloud compute tpus tpu-vm create nf-f0 --zone={ZONE} '
                      f'--accelerator-type={accelerator_type} --version=tpu-ubuntu2204-base')
  assert lines[1] == (f'gcloud compute tpus tpu-vm scp /tmp/nfnets-code-nf-f0.tar.gz nf-f0:nfnets-code.tar.gz '
                      f'--zone={ZONE} --worker=all').replace('/tmp', launch_tpu_pod.tempfile.gettempdir())
  setup = _remote_script(lines[2])
  assert setup.startswith('rm -rf nfnets && mkdir nfnets && tar -xzf nfnets-code.tar.gz -C nfnets && ')
  assert 'python3.11 -m venv nfnets-venv' in setup
  assert setup.endswith("nfnets-venv/bin/pip install -q -r nfnets/requirements.txt 'jax[tpu]==0.10.2'")
  assert 'setsid nohup bash -c' in _remote_script(lines[3])
  assert lines[4] == f"gcloud compute tpus tpu-vm describe nf-f0 --zone={ZONE} '--format=value(state)'"
  assert 'job $(hostname)' in _remote_script(lines[5])
  # Single- and multi-host slices differ only in the accelerator type: every ssh and scp reaches all workers.
  assert all('--worker=all' in line for line in lines[1:4] + lines[5:])


def test_spot_project_and_runtime_flags(capsys):
  # gcloud-style hyphens and absl-style underscores both work.
  lines = _dry_run_lines(capsys, 'create', '--dry-run', '--name=nf-f1', f'--zone={ZONE}',
                         '--accelerator-type=v5litepod-16', '--spot', '--project=my-proj')
  assert lines == [f'gcloud compute tpus tpu-vm create nf-f1 --zone={ZONE} --project=my-proj '
                   '--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot']
  lines = _dry_run_lines(capsys, 'create', '--dry_run', '--name=nf-f1', f'--zone={ZONE}',
                         '--accelerator_type=v3-32', '--preemptible', '--runtime_version=tpu-vm-base')
  assert lines == [f'gcloud compute tpus tpu-vm create nf-f1 --zone={ZONE} --accelerator-type=v3-32 '
                   '--version=tpu-vm-base --preemptible']


def test_queued_resource_commands(capsys):
  pod = ['--dry-run', '--name=nf-f0', f'--zone={ZONE}', '--queued', '--queued_resource=nf-f0-qr']
  lines = _dry_run_lines(capsys, 'create', *pod, '--accelerator_type=v4-64', '--spot')
  assert lines == [
      f'gcloud compute tpus queued-resources create nf-f0-qr --zone={ZONE} --accelerator-type=v4-64 '
      '--runtime-version=tpu-ubuntu2204-base --node-id=nf-f0 --spot',
      f"gcloud compute tpus queued-resources describe nf-f0-qr --zone={ZONE} '--format=value(state.state)'"]
  assert _dry_run_lines(capsys, 'delete', *pod) == [
      f'gcloud compute tpus queued-resources delete nf-f0-qr --zone={ZONE} --force --quiet']
  assert _dry_run_lines(capsys, 'delete', *pod[:3]) == [
      f'gcloud compute tpus tpu-vm delete nf-f0 --zone={ZONE} --quiet']


def test_setup_from_a_git_repository(capsys):
  lines = _dry_run_lines(capsys, 'setup', '--dry-run', '--name=nf-f0', f'--zone={ZONE}', '--jax_version=0.10.2',
                         '--repo_url=https://example.com/me/nf nets.git', '--repo_ref=v1.0')
  assert len(lines) == 1  # nothing to copy
  assert _remote_script(lines[0]).startswith(
      "rm -rf nfnets && git clone --quiet 'https://example.com/me/nf nets.git' nfnets && "
      'git -C nfnets checkout --quiet v1.0 && ')


@pytest.mark.skipif(shutil.which('gcloud') is None, reason='the Google Cloud CLI is not installed')
def test_the_installed_gcloud_parses_every_command(tmp_path, capsys):
  """gcloud checks its arguments before it authenticates: with an empty configuration (no account, no
  metadata-server credentials, the TPU API pointed at a closed local port) every command must get as far
  as asking for an account, i.e. past the argument parser. Nothing can reach Google Cloud."""
  pod = ['--dry-run', '--name=nf-f0', f'--zone={ZONE}', '--project=nfnets-test']
  queued = [*pod, '--queued', '--accelerator_type=v4-64', '--spot']
  lines = [*_dry_run_lines(capsys, *_run_args('nf-f0', 'v4-32', '--spot', '--project=nfnets-test'))[:5],
           *_dry_run_lines(capsys, 'create', *queued), _dry_run_lines(capsys, 'delete', *queued[:-2])[0],
           _dry_run_lines(capsys, 'delete', *pod)[0]]
  assert len(set(lines)) == 9
  env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / 'gcloud'), CLOUDSDK_CORE_CHECK_GCE_METADATA='false',
             CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU='http://127.0.0.1:9/', CLOUDSDK_CORE_DISABLE_PROMPTS='1')
  for line in lines:
    result = subprocess.run(shlex.split(line), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'You do not currently have an active account selected' in result.stderr, (line, result.stderr)


def _fake_worker(tmp_path, python_body):
  """A worker's home directory with the code folder and a fake venv python running `python_body`."""
  home = tmp_path / 'home'
  (home / 'nfnets').mkdir(parents=True)
  python = home / 'nfnets-venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text(f'#!{sys.executable}\nimport json, sys, time\n{python_body}\n')
  python.chmod(0o755)
  return home


def _on_worker(home, script):
  return subprocess.run(['bash', '-c', script], cwd=home, env=dict(os.environ, HOME=str(home)),
                        capture_output=True, text=True, timeout=30)


def _wait_for(path, seconds=20):
  deadline = time.time() + seconds
  while not path.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert path.exists(), path


def test_worker_scripts_start_the_exact_command_detached_and_report_it(tmp_path, capsys):
  lines = _dry_run_lines(capsys, *_run_args('nf-f0', 'v4-32'))
  train_script, status_script = _remote_script(lines[3]), _remote_script(lines[5])
  home = _fake_worker(tmp_path, "json.dump(sys.argv[1:], open('../argv.json', 'w'))\n"
                                "print('final: step 9 | test top-1 50.00%')")
  started = _on_worker(home, train_script)
  assert started.returncode == 0, started.stderr
  _wait_for(home / 'nfnets-train.exit')
  assert json.loads((home / 'argv.json').read_text()) == EXPECTED_TRAIN_ARGS
  assert (home / 'nfnets-train.log').read_text().startswith('final: step 9')
  status = _on_worker(home, status_script).stdout
  assert tpu_pod.parse_job_status(status) == [tpu_pod.WorkerJob(socket.gethostname(), 'exited:0', True)]
  logs = _on_worker(home, _remote_script(_dry_run_lines(capsys, 'logs', '--dry-run', '--name=nf-f0',
                                                        f'--zone={ZONE}', '--lines=5')[0]))
  assert logs.stdout == f'{socket.gethostname()}: final: step 9 | test top-1 50.00%\n'


def test_a_second_job_is_refused_while_one_runs(tmp_path, capsys):
  train_script = _remote_script(_dry_run_lines(capsys, *_run_args('nf-f0', 'v4-8'))[3])
  status_script = _remote_script(shlex.join(tpu_pod.job_status_command(tpu_pod.Pod('nf-f0', ZONE))))
  home = _fake_worker(tmp_path, 'time.sleep(60)')
  assert _on_worker(home, train_script).returncode == 0
  _wait_for(home / 'nfnets-train.pid')
  pid = int((home / 'nfnets-train.pid').read_text())
  try:
    assert tpu_pod.parse_job_status(_on_worker(home, status_script).stdout)[0].state == 'running'
    second = _on_worker(home, train_script)
    assert second.returncode == 1 and 'already running' in second.stderr
  finally:
    os.kill(pid, 15)
  _wait_for(home / 'nfnets-train.exit')
  assert tpu_pod.parse_job_status(_on_worker(home, status_script).stdout)[0].state == 'exited:143'


class FakeGcloud:
  """Answers `describe` with the queued TPU states and the job-status ssh with the queued outputs."""

  def __init__(self, states, job_outputs, fail=None):
    self.states, self.job_outputs, self.fail, self.calls = list(states), list(job_outputs), fail, []

  def __call__(self, argv, capture):
    self.calls.append(argv)
    if self.fail and argv[4] == self.fail[0]:
      return launch_tpu_pod.Result(1, stderr=f'Waiting for operation\n{self.fail[1]}\n')
    if argv[4] == 'describe':
      state = self.states.pop(0)
      if state is None:
        return launch_tpu_pod.Result(1, stderr='ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: gone')
      return launch_tpu_pod.Result(0, stdout=state + '\n')
    if argv[4] == 'ssh' and 'job $(hostname)' in argv[-1]:
      return launch_tpu_pod.Result(0, stdout=self.job_outputs.pop(0))
    return launch_tpu_pod.Result(0)

  def steps(self):
    return [argv[4] if argv[4] != 'ssh' else ('train' if 'setsid' in argv[-1] else
                                            'status' if 'job $(hostname)' in argv[-1] else 'setup')
            for argv in self.calls]


def _real_run_args(*extra):
  return [arg for arg in _run_args('nf-f0', 'v4-32', '--spot', '--repo_url=https://example.com/nf.git',
                                   '--poll_seconds=7', *extra) if arg != '--dry-run']


RUNNING = 'job w0 running final=0\njob w1 running final=0\n'
FINISHED = 'job w0 exited:0 final=1\njob w1 exited:0 final=0\n'


@pytest.mark.parametrize('lost_state', ['PREEMPTED', None])
def test_run_recreates_a_preempted_slice_and_restarts_the_same_command(lost_state, capsys):
  gcloud = FakeGcloud([lost_state, 'READY', 'READY'], [RUNNING, FINISHED])
  sleeps = []
  assert _launch(*_real_run_args(), runner=gcloud, sleep=sleeps.append) == 0
  assert gcloud.steps() == ['create', 'setup', 'train', 'describe', 'delete', 'create', 'setup', 'train',
                            'describe', 'status', 'describe', 'status']
  first_train, second_train = [argv for argv in gcloud.calls if 'setsid' in argv[-1]]
  assert first_train == second_train  # the same command, which resumes from the workdir
  assert gcloud.calls[4] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'nf-f0', f'--zone={ZONE}', '--quiet']
  assert gcloud.calls[0] == gcloud.calls[5] and '--spot' in gcloud.calls[0]
  assert sleeps == [7, 7, 7]
  assert 'training finished' in capsys.readouterr().err


def test_watch_alone_follows_a_running_job_to_its_end(capsys):
  gcloud = FakeGcloud(['READY', 'READY'], [RUNNING, FINISHED])
  assert _launch('watch', *_real_run_args()[1:], runner=gcloud) == 0
  assert gcloud.steps() == ['describe', 'status', 'describe', 'status']
  assert 'training finished' in capsys.readouterr().err


def test_run_restarts_a_job_stopped_by_sigterm_and_reports_a_crash(capsys):
  gcloud = FakeGcloud(['READY', 'READY'], ['job w0 exited:0 final=0\n', 'job w0 exited:1 final=0\n'])
  assert _launch(*_real_run_args(), runner=gcloud) == 1
  assert gcloud.steps() == ['create', 'setup', 'train', 'describe', 'status', 'train', 'describe', 'status']
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == "error: step 'watch' failed: training stopped on the workers (w0 exited:1); see " \
                    '`launch_tpu_pod logs`'


def test_a_failing_gcloud_call_stops_with_one_line(capsys):
  gcloud = FakeGcloud([], [], fail=('create', 'ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: no'))
  assert _launch(*_real_run_args(), runner=gcloud) == 1
  assert gcloud.steps() == ['create']
  captured = capsys.readouterr()
  assert captured.err == ("error: step 'create' failed: gcloud exited 1: "
                          'ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: no\n')


def test_run_gcloud_reports_a_missing_binary_and_keeps_stderr(tmp_path):
  assert launch_tpu_pod.run_gcloud([str(tmp_path / 'gcloud')], True).returncode == 127
  result = launch_tpu_pod.run_gcloud([sys.executable, '-c', 'import sys; sys.exit("quota exceeded")'], False)
  assert (result.returncode, result.stderr.strip()) == (1, 'quota exceeded')


TRAIN = ['train', '--config=configs/nfnet.py:F0']


@pytest.mark.parametrize('args, message', [
    ([*TRAIN, '--workdir=/tmp/f0'], 'must be a gs:// path'),
    (['train', '--config=configs/nope.py:F0', '--workdir=gs://b/f0'], "config file 'configs/nope.py' not found"),
    ([*TRAIN, '--workdir=gs://b/f0', '--override=seed=1'], 'must look like config.field=value'),
    (['delete', '--workdir=gs://b/f0'], '--workdir does not apply to `delete`'),
    (['create', '--accelerator_type=tpu-32'], 'not of the form'),
    (['create', '--accelerator_type=v4-8', '--spot', '--preemptible'], 'exclude each other'),
    (['launch'], 'give one subcommand'),
    (['status', '--zonee=x'], 'bad command line'),
])
def test_bad_input_is_one_line(args, message, capsys):
  gcloud = FakeGcloud([], [])
  assert _launch(*args, '--name=nf-f0', f'--zone={ZONE}', runner=gcloud) == 2
  assert not gcloud.calls
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err and err.count('\n') == 1, err


def test_pack_code_ships_tracked_and_untracked_files_but_not_ignored_ones(tmp_path):
  repo = tmp_path / 'repo'
  (repo / 'configs').mkdir(parents=True)
  (repo / 'configs' / 'nfnet.py').write_text('tracked')
  (repo / '.gitignore').write_text('runs/\n')
  git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t']
  subprocess.run([*git, 'init', '-q'], check=True)
  subprocess.run([*git, 'add', '.'], check=True)
  subprocess.run([*git, 'commit', '-qm', 'x'], check=True)
  (repo / 'local_edit.py').write_text('untracked')
  (repo / 'runs').mkdir()
  (repo / 'runs' / 'big.bin').write_text('ignored')
  archive = tmp_path / 'code.tar.gz'
  assert launch_tpu_pod.pack_code(str(repo), str(archive)) == 3
  with tarfile.open(archive) as tar:
    assert sorted(tar.getnames()) == ['.gitignore', 'configs/nfnet.py', 'local_edit.py']
