"""The TPU pod launcher: its exact gcloud commands, the worker-side scripts (run here with bash), and every
waiting path (stock-outs, queued resources, preemption, stuck states) with a fake gcloud and a fake clock.
Nothing here calls Google Cloud, and nothing sleeps for real."""
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
from scripts import tested_stack
from scripts import tpu_launcher
from scripts import tpu_pod
from scripts import tpu_types
from tests.helpers import REPO_ROOT

ZONE = 'us-central2-b'
WORKDIR = 'gs://bucket/f0'
TARBALL = os.path.join(launch_tpu_pod.tempfile.gettempdir(), 'nfnets-code-nf-f0.tar.gz')
# Overrides with quotes and spaces must reach experiments.train on the workers exactly as given.
OVERRIDES = ("config.model.name='nfnet'", 'config.data.data_dir=gs://bucket/my data', '--config.seed=3')
EXPECTED_TRAIN_ARGS = ['-m', 'experiments.train', '--config=configs/nfnet.py:F0', f'--workdir={WORKDIR}',
                       '--config.distributed=True', "--config.model.name='nfnet'",
                       '--config.data.data_dir=gs://bucket/my data', '--config.seed=3']
APT = 'sudo env DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a apt-get -o DPkg::Lock::Timeout=600 -qq'
PY_OK = "python3.13 -c 'import ensurepip, sys; sys.exit(sys.version_info[:2] < (3, 12))'"
# The whole setup script for the default (newest tested) stack: Python 3.13 and jax[tpu] 0.12.1.
EXPECTED_SETUP = (
    'rm -rf nfnets && mkdir nfnets && tar -xzf nfnets-code.tar.gz -C nfnets && '
    f'if ! {PY_OK} 2> /dev/null; then {APT} update && {{ {APT} install -y python3.13 python3.13-venv > /dev/null '
    '2>&1 || { sudo env DEBIAN_FRONTEND=noninteractive add-apt-repository -y ppa:deadsnakes/ppa > /dev/null && '
    f'{APT} update && {APT} install -y python3.13 python3.13-venv > /dev/null; }}; }} || true; fi && '
    f'if ! {PY_OK} 2> /dev/null; then echo "$(hostname): Python 3.13 (>= 3.12 for jax 0.12.1) with venv is '
    'missing: apt could not install python3.13 python3.13-venv, from Ubuntu or ppa:deadsnakes/ppa" >&2; exit 1; '
    'fi && rm -rf nfnets-venv && python3.13 -m venv nfnets-venv && nfnets-venv/bin/pip install -q --upgrade pip '
    "&& nfnets-venv/bin/pip install -q -r nfnets/requirements.txt 'jax[tpu]==0.12.1'")


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
  """The code the launcher ships: a config file and a requirements.txt whose jax pin admits every tested JAX
  (the launcher refuses a --jax_version outside the shipped code's pin)."""
  root = tmp_path_factory.mktemp('checkout')
  (root / 'configs').mkdir()
  (root / 'configs' / 'nfnet.py').write_text('# a config')
  (root / 'requirements.txt').write_text('numpy>=2.0\njax>=0.10,<0.13   # the tested range\n')
  return root


@pytest.fixture(autouse=True)
def local_jax_is_the_newest_tested(monkeypatch):
  """This machine's JAX only changes a warning; the tests that do not look for it fix it to the tested one."""
  monkeypatch.setattr(launch_tpu_pod, 'local_jax_version', lambda: tested_stack.NEWEST.jax)


class FakeTime:
  """A clock that only `sleep` moves."""

  def __init__(self):
    self.now, self.sleeps = 1000.0, []

  def sleep(self, seconds):
    self.sleeps.append(seconds)
    self.now += seconds

  def clock(self):
    return self.now


def _launch(*args, runner=None, fake_time=None):
  fake_time = fake_time or FakeTime()
  kwargs = {'runner': runner} if runner is not None else {}
  return launch_tpu_pod.main(['launch_tpu_pod', *args], sleep=fake_time.sleep, clock=fake_time.clock, **kwargs)


def _run_args(checkout, accelerator_type, *extra, name='nf-f0'):
  overrides = [arg for override in OVERRIDES for arg in ('--override', override)]
  return ['run', '--dry-run', '--name', name, '--zone', ZONE, '--accelerator_type', accelerator_type,
          '--config', 'configs/nfnet.py:F0', '--workdir', WORKDIR, f'--local_dir={checkout}', *overrides, *extra]


def _dry_run_lines(capsys, *args):
  assert _launch(*args) == 0, capsys.readouterr().err
  return capsys.readouterr().out.splitlines()


def _remote_script(line):
  """The shell script a printed `gcloud ... ssh --command=SCRIPT` line runs on each worker."""
  argv = [word for word in shlex.split(line) if word != 'alpha']
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'] and '--worker=all' in argv
  [command] = [arg for arg in argv if arg.startswith('--command=')]
  return command[len('--command='):]


@pytest.mark.parametrize('accelerator_type, runtime', [
    ('v4-32', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v6e-16', 'v2-alpha-tpuv6e')])
def test_run_dry_run_prints_the_exact_commands(accelerator_type, runtime, checkout, capsys):
  lines = _dry_run_lines(capsys, *_run_args(checkout, accelerator_type))
  assert len(lines) == 6
  assert lines[0] == (f'gcloud compute tpus tpu-vm create nf-f0 --zone={ZONE} '
                      f'--accelerator-type={accelerator_type} --version={runtime}')
  assert lines[1] == f'gcloud compute tpus tpu-vm scp {TARBALL} nf-f0:nfnets-code.tar.gz --zone={ZONE} --worker=all'
  assert lines[2] == shlex.join(['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'nf-f0', f'--zone={ZONE}',
                                 '--worker=all', f'--command={EXPECTED_SETUP}'])
  assert lines[3].startswith(f'gcloud compute tpus tpu-vm ssh nf-f0 --zone={ZONE} --worker=all ')
  assert 'setsid nohup bash -c' in _remote_script(lines[3])
  assert lines[4] == f"gcloud compute tpus tpu-vm describe nf-f0 --zone={ZONE} '--format=value(state)'"
  assert lines[5].startswith(f'gcloud compute tpus tpu-vm ssh nf-f0 --zone={ZONE} --worker=all ')
  assert 'job $(hostname)' in _remote_script(lines[5])


def test_the_workers_get_the_tested_stack_whatever_jax_this_machine_has(checkout, capsys, monkeypatch):
  monkeypatch.setattr(launch_tpu_pod, 'local_jax_version', lambda: '0.11.2')
  setup = ['setup', '--dry-run', '--name=nf-f0', f'--zone={ZONE}', f'--local_dir={checkout}']
  assert _launch(*setup) == 0
  captured = capsys.readouterr()
  assert _remote_script(captured.out.splitlines()[1]) == EXPECTED_SETUP
  assert tested_stack.NEWEST == tested_stack.Stack('3.13', '0.12.1')
  assert captured.err == ('warning: this machine has jax 0.11.2; the workers get jax[tpu]==0.12.1 on Python 3.13 '
                          '(--jax_version, --python)\n')
  # The oldest tested pair: jax 0.10.2 on Python 3.11, picked from --jax_version alone.
  script = _remote_script(_dry_run_lines(capsys, *setup, '--jax_version=0.10.2')[1])
  assert "python3.11 -c 'import ensurepip, sys; sys.exit(sys.version_info[:2] < (3, 11))'" in script
  assert script.endswith("python3.11 -m venv nfnets-venv && nfnets-venv/bin/pip install -q --upgrade pip && "
                         "nfnets-venv/bin/pip install -q -r nfnets/requirements.txt 'jax[tpu]==0.10.2'")
  script = _remote_script(_dry_run_lines(capsys, *setup, '--python=python3.12')[1])
  assert 'python3.12 -m venv nfnets-venv' in script and "'jax[tpu]==0.12.1'" in script


@pytest.mark.parametrize('args, message', [
    (['--python=3.11'], 'jax 0.12.1 needs Python >= 3.12, not 3.11'),
    (['--jax_version=latest'], "--jax_version must be a JAX release such as 0.12.1, got 'latest'"),
])
def test_an_impossible_python_jax_pair_is_refused(args, message, checkout, capsys):
  gcloud = FakeGcloud()
  assert _launch('setup', '--name=nf-f0', f'--zone={ZONE}', f'--local_dir={checkout}', *args, runner=gcloud) == 2
  assert not gcloud.calls
  assert capsys.readouterr().err.splitlines()[-1] == f'error: {message}'


def test_setup_refuses_a_jax_outside_the_shipped_requirements(tmp_path, capsys):
  (tmp_path / 'requirements.txt').write_text('git+https://example.com/x.git\njax>=0.10,<0.13\njaxlib>=0.10,<0.11\n')
  gcloud = FakeGcloud()
  assert _launch('setup', '--name=nf-f0', f'--zone={ZONE}', f'--local_dir={tmp_path}', runner=gcloud) == 1
  assert not gcloud.calls
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"error: step 'setup' failed: jax 0.12.1 is outside {tmp_path}/requirements.txt's jaxlib pin <0.11,>=0.10; "
      'pass a --jax_version inside it')


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


def test_preemptible_says_its_24_hour_limit_and_points_to_spot(capsys):
  assert _launch('--help') == 0
  help_text = ' '.join(capsys.readouterr().out.split())
  assert 'stopped after at most 24 hours, even if not preempted before. Prefer --spot' in help_text
  assert _launch('create', '--dry-run', '--name=nf-f1', f'--zone={ZONE}', '--accelerator_type=v4-8',
                 '--preemptible') == 0
  assert capsys.readouterr().err == ('note: a preemptible slice is stopped after at most 24 hours; --spot has no '
                                     'such limit\n')


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


PRIVATE = ['--internal_ips', '--service_account=trainer@my-proj.iam.gserviceaccount.com', '--scopes=cloud-platform']
PRIVATE_FLAGS = ('--internal-ips --service-account=trainer@my-proj.iam.gserviceaccount.com '
                 '--scopes=cloud-platform')


def test_private_slices_are_created_without_external_ips_with_their_service_account(capsys):
  lines = _dry_run_lines(capsys, 'create', '--dry-run', '--name=nf-f0', f'--zone={ZONE}',
                         '--accelerator_type=v6e-16', *PRIVATE)
  assert lines == [f'gcloud compute tpus tpu-vm create nf-f0 --zone={ZONE} --accelerator-type=v6e-16 '
                   f'--version=v2-alpha-tpuv6e {PRIVATE_FLAGS}']
  lines = _dry_run_lines(capsys, 'create', '--dry-run', '--name=nf-f0', f'--zone={ZONE}',
                         '--accelerator_type=v6e-16', '--queued', '--spot', *PRIVATE)
  assert lines[0] == (f'gcloud compute tpus queued-resources create nf-f0 --zone={ZONE} --accelerator-type=v6e-16 '
                      f'--runtime-version=v2-alpha-tpuv6e --node-id=nf-f0 --spot {PRIVATE_FLAGS}')


@pytest.mark.parametrize('route, prefix, flag', [
    ('--tunnel_through_iap', 'gcloud alpha compute tpus tpu-vm', '--tunnel-through-iap'),
    ('--internal_ip', 'gcloud compute tpus tpu-vm', '--internal-ip'),
])
def test_every_ssh_and_scp_takes_the_private_route(route, prefix, flag, checkout, capsys):
  """gcloud offers --tunnel-through-iap for TPU VMs only in its alpha track; --internal-ip is GA."""
  pod = ['--dry-run', '--name=nf-f0', f'--zone={ZONE}', route]
  lines = (_dry_run_lines(capsys, *_run_args(checkout, 'v4-32', *PRIVATE, route)) +
           _dry_run_lines(capsys, 'logs', *pod) + _dry_run_lines(capsys, 'status', *pod) +
           _dry_run_lines(capsys, 'setup', *pod, f'--local_dir={checkout}') +
           _dry_run_lines(capsys, 'train', *pod, '--config=configs/nfnet.py:F0', f'--workdir={WORKDIR}'))
  remote = [line for line in lines if ' ssh ' in line or ' scp ' in line]
  assert len(remote) == 9
  for line in remote:
    argv = shlex.split(line)
    assert line.startswith(prefix + ' ') and argv.count(flag) == 1, line
    assert argv.index(flag) == argv.index('--worker=all') + 1
  assert lines[0].endswith(PRIVATE_FLAGS)
  assert lines[1] == f'{prefix} scp {TARBALL} nf-f0:nfnets-code.tar.gz --zone={ZONE} --worker=all {flag}'


def test_private_workers_need_a_route(checkout, capsys):
  gcloud = FakeGcloud()
  assert _launch(*[a for a in _run_args(checkout, 'v4-32', *PRIVATE) if a != '--dry-run'], runner=gcloud) == 2
  assert not gcloud.calls
  assert capsys.readouterr().err.splitlines()[-1] == (
      'error: with --internal_ips the workers have no external IP: add --tunnel_through_iap, or --internal_ip '
      'when running from a machine in the same VPC')


@pytest.mark.parametrize('accelerator_type, message', [
    ('v5e-16', "accelerator type 'v5e-16' does not exist; did you mean v5litepod-16?"),
    ('v6-8', "accelerator type 'v6-8' does not exist; did you mean v6e-8?"),
    ('V4-32', "accelerator type 'V4-32' does not exist; did you mean v4-32?"),
    ('v5-16', "accelerator type 'v5-16' does not exist; did you mean v5p-16 or v5litepod-16?"),
    ('v6e-12', "accelerator type 'v6e-12' does not exist; v6e slices are v6e-1, v6e-4, v6e-8, v6e-16, v6e-32, "
               'v6e-64, v6e-128, v6e-256'),
    ('v4-12', "accelerator type 'v4-12' does not exist; a v4 size counts TensorCores, a multiple of 8 (8 per "
              'host), e.g. v4-8, v4-32'),
    ('tpu7x-8', "accelerator type 'tpu7x-8': TPU7x (Ironwood) is not offered through the Cloud TPU API (gcloud "
                'compute tpus) that this launcher uses; Google offers it through GKE and Compute Engine'),
    ('v8-16', "accelerator type 'v8-16': unknown TPU generation 'v8'; the Cloud TPU API offers v2, v3, v4, v5p, "
              'v5litepod (v5e) and v6e'),
])
def test_an_accelerator_type_google_does_not_offer_is_refused_with_its_spelling(accelerator_type, message,
                                                                              capsys):
  gcloud = FakeGcloud()
  assert _launch('create', '--name=nf-f0', f'--zone={ZONE}', f'--accelerator_type={accelerator_type}',
                 runner=gcloud) == 2
  assert not gcloud.calls
  assert capsys.readouterr().err == f'error: {message}\n'


@pytest.mark.parametrize('accelerator_type', ['v2-8', 'v3-32', 'v4-8', 'v4-4096', 'v5p-8', 'v5p-128',
                                              'v5litepod-1', 'v5litepod-256', 'v6e-1', 'v6e-8', 'v6e-256'])
def test_current_accelerator_types_are_accepted(accelerator_type):
  assert tpu_types.check_accelerator_type(accelerator_type) == accelerator_type.split('-')[0]


def test_setup_from_a_git_repository(capsys):
  lines = _dry_run_lines(capsys, 'setup', '--dry-run', '--name=nf-f0', f'--zone={ZONE}', '--jax_version=0.10.2',
                         '--repo_url=https://example.com/me/nf nets.git', '--repo_ref=v1.0')
  assert len(lines) == 1  # nothing to copy
  assert _remote_script(lines[0]).startswith(
      "rm -rf nfnets && git clone --quiet 'https://example.com/me/nf nets.git' nfnets && "
      'git -C nfnets checkout --quiet v1.0 && ')


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('gcloud') is None, reason='the Google Cloud CLI is not installed')
def test_the_installed_gcloud_parses_every_command(checkout, tmp_path, capsys):
  """gcloud checks its arguments before it authenticates: with an empty configuration (no account, no
  metadata-server credentials, the TPU API pointed at a closed local port) every command must get as far
  as asking for an account, i.e. past the argument parser. Nothing can reach Google Cloud."""
  pod = ['--dry-run', '--name=nf-f0', f'--zone={ZONE}', '--project=nfnets-test']
  queued = [*pod, '--queued', '--accelerator_type=v4-64', '--spot']
  # One line of each shape: the ssh lines differ only in their remote script, which gcloud does not parse.
  create, scp, setup, _, describe, _ = _dry_run_lines(capsys, *_run_args(checkout, 'v4-32', '--spot',
                                                                          '--project=nfnets-test'))
  lines = [create, scp, setup, describe,
           *_dry_run_lines(capsys, 'create', *queued, *PRIVATE), _dry_run_lines(capsys, 'delete', *queued[:-2])[0],
           _dry_run_lines(capsys, 'delete', *pod)[0],
           *_dry_run_lines(capsys, *_run_args(checkout, 'v6e-16', *PRIVATE, '--tunnel_through_iap',
                                              '--project=nfnets-test'))[:3],
           *_dry_run_lines(capsys, 'logs', *pod, '--internal_ip')]
  assert len(set(lines)) == 12
  env = dict(os.environ, CLOUDSDK_CORE_CHECK_GCE_METADATA='false',
             CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU='http://127.0.0.1:9/', CLOUDSDK_CORE_DISABLE_PROMPTS='1')
  # All at once, each with a configuration directory of its own (gcloud locks it): a gcloud run mostly waits.
  processes = [subprocess.Popen(shlex.split(line), env=dict(env, CLOUDSDK_CONFIG=str(tmp_path / f'gcloud{i}')),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for i, line in enumerate(lines)]
  for line, process in zip(lines, processes):
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert 'You do not currently have an active account selected' in stderr, (line, stderr)


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


def test_worker_scripts_start_the_exact_command_detached_and_report_it(tmp_path, checkout, capsys):
  lines = _dry_run_lines(capsys, *_run_args(checkout, 'v4-32'))
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


def test_a_second_job_is_refused_while_one_runs(tmp_path, checkout, capsys):
  train_script = _remote_script(_dry_run_lines(capsys, *_run_args(checkout, 'v4-8'))[3])
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


def _fake_tools(tmp_path, apt_installs_python):
  """A PATH for the setup script: sudo and env run their command; apt-get and add-apt-repository log each
  call with the environment it got; with `apt_installs_python`, `apt-get install` provides a python3.13 whose
  venv's pip logs its arguments. Nothing else of the host leaks in (no real python3.13, no real apt)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in ('rm', 'mkdir', 'tar', 'gzip', 'hostname', 'cat', 'env', 'bash', 'chmod', 'dirname'):
    os.symlink(shutil.which(tool), bin_dir / tool)
  log = tmp_path / 'calls.log'
  scripts = {
      'sudo': '"$@"',
      'add-apt-repository': f'echo "add-apt-repository $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {log}; exit 1',
      'apt-get': (f'echo "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND NEEDRESTART_MODE=$NEEDRESTART_MODE" >> {log}\n'
                  + (f'case " $* " in *" install "*) cat > {bin_dir}/python3.13 <<\'PY\'\n'
                     '#!/bin/bash\n'
                     'if [ "$1" = -m ]; then mkdir -p "$3/bin"; printf \'#!/bin/bash\\necho "pip $*" >> '
                     f'{log}\\n\' > "$3/bin/pip"; chmod +x "$3/bin/pip"; fi\n'
                     'PY\n'
                     f'chmod +x {bin_dir}/python3.13;; esac'
                     if apt_installs_python else 'case " $* " in *" install "*) exit 100;; esac')),
  }
  for name, body in scripts.items():
    (bin_dir / name).write_text(f'#!/bin/bash\n{body}\n')
    (bin_dir / name).chmod(0o755)
  return bin_dir, log


@pytest.mark.parametrize('apt_installs_python', [True, False])
def test_setup_script_installs_python_non_interactively_or_stops_with_one_line(apt_installs_python, tmp_path,
                                                                                checkout, capsys):
  script = _remote_script(_dry_run_lines(capsys, 'setup', '--dry-run', '--name=nf-f0', f'--zone={ZONE}',
                                         f'--local_dir={checkout}')[1])
  home = tmp_path / 'home'
  home.mkdir()
  with tarfile.open(home / 'nfnets-code.tar.gz', 'w:gz') as tar:
    tar.add(checkout / 'requirements.txt', arcname='requirements.txt')
  bin_dir, log = _fake_tools(tmp_path, apt_installs_python)
  result = subprocess.run([str(bin_dir / 'bash'), '-c', script], cwd=home, capture_output=True, text=True,
                          timeout=30, env={'HOME': str(home), 'PATH': str(bin_dir)})
  calls = log.read_text().splitlines()
  apt_calls = [call for call in calls if call.startswith(('apt-get', 'add-apt-repository'))]
  assert all('DEBIAN_FRONTEND=noninteractive' in call for call in apt_calls)
  assert all('NEEDRESTART_MODE=a' in call for call in apt_calls if call.startswith('apt-get'))
  if apt_installs_python:
    assert result.returncode == 0, result.stderr
    assert [call.split(' DEBIAN')[0] for call in apt_calls] == [
        'apt-get -o DPkg::Lock::Timeout=600 -qq update',
        'apt-get -o DPkg::Lock::Timeout=600 -qq install -y python3.13 python3.13-venv']
    assert calls[-2:] == ['pip install -q --upgrade pip',
                          'pip install -q -r nfnets/requirements.txt jax[tpu]==0.12.1']
  else:
    assert result.returncode == 1
    assert result.stderr == (f'{socket.gethostname()}: Python 3.13 (>= 3.12 for jax 0.12.1) with venv is '
                             'missing: apt could not install python3.13 python3.13-venv, from Ubuntu or '
                             'ppa:deadsnakes/ppa\n')
    assert apt_calls[-1].startswith('add-apt-repository -y ppa:deadsnakes/ppa')
    assert not (home / 'nfnets-venv').exists()


class FakeGcloud:
  """Answers like gcloud: `create` fails with `create_errors` in turn, then succeeds; the TPU VM's and the
  queued resource's `describe` return `states` / `queued_states` in turn (None: NOT_FOUND); the job-status
  ssh returns `job_outputs` in turn; `fail` = (verb, stderr) makes that verb fail every time."""

  def __init__(self, states=(), job_outputs=(), fail=None, create_errors=(), queued_states=()):
    self.states, self.job_outputs, self.fail = list(states), list(job_outputs), fail
    self.create_errors, self.queued_states, self.calls = list(create_errors), list(queued_states), []

  def __call__(self, argv, capture):
    self.calls.append(argv)
    words = [word for word in argv if word != 'alpha']
    verb = words[4]
    if self.fail and verb == self.fail[0]:
      return tpu_launcher.Result(1, stderr=f'Waiting for operation\n{self.fail[1]}\n')
    if verb == 'create' and self.create_errors:
      return tpu_launcher.Result(1, stderr=self.create_errors.pop(0))
    if verb == 'describe':
      state = (self.queued_states if words[3] == 'queued-resources' else self.states).pop(0)
      if state is None:
        return tpu_launcher.Result(1, stderr='ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: gone')
      return tpu_launcher.Result(0, stdout=state + '\n')
    if verb == 'ssh' and 'job $(hostname)' in argv[-1]:
      return tpu_launcher.Result(0, stdout=self.job_outputs.pop(0))
    return tpu_launcher.Result(0)

  def steps(self):
    steps = []
    for argv in self.calls:
      words = [word for word in argv if word != 'alpha']
      verb = words[4]
      if verb == 'ssh':
        verb = 'train' if 'setsid' in argv[-1] else 'status' if 'job $(hostname)' in argv[-1] else 'setup'
      steps.append(verb)
    return steps


def _real_run_args(checkout, *extra):
  return [arg for arg in _run_args(checkout, 'v4-32', '--spot', '--repo_url=https://example.com/nf.git',
                                   '--poll_seconds=7', *extra) if arg != '--dry-run']


RUNNING = 'job w0 running final=0\njob w1 running final=0\n'
FINISHED = 'job w0 exited:0 final=1\njob w1 exited:0 final=0\n'
STOCK_OUT = ('ERROR: (gcloud.compute.tpus.tpu-vm.create) {"code": 8, "message": "There is no more capacity in the '
             'zone \\"us-central2-b\\"; you can try in another zone where Cloud TPU Nodes are offered (see '
             'https://cloud.google.com/tpu/docs/regions) [EID: 0x1]"}\n')


@pytest.mark.parametrize('lost_state', ['PREEMPTED', None])
def test_run_recreates_a_preempted_slice_and_restarts_the_same_command(lost_state, checkout, capsys):
  gcloud = FakeGcloud([lost_state, 'READY', 'READY'], [RUNNING, FINISHED])
  fake_time = FakeTime()
  assert _launch(*_real_run_args(checkout), runner=gcloud, fake_time=fake_time) == 0
  assert gcloud.steps() == ['create', 'setup', 'train', 'describe', 'delete', 'create', 'setup', 'train',
                            'describe', 'status', 'describe', 'status']
  first_train, second_train = [argv for argv in gcloud.calls if 'setsid' in argv[-1]]
  assert first_train == second_train  # the same command, which resumes from the workdir
  assert gcloud.calls[4] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'nf-f0', f'--zone={ZONE}', '--quiet']
  assert gcloud.calls[0] == gcloud.calls[5] and '--spot' in gcloud.calls[0]
  assert fake_time.sleeps == [7, 7, 7]
  assert 'training finished' in capsys.readouterr().err


def test_a_stock_out_is_retried_with_growing_pauses_until_the_slice_is_created(checkout, capsys):
  gcloud = FakeGcloud(['READY'], [FINISHED], create_errors=[STOCK_OUT] * 5)
  fake_time = FakeTime()
  assert _launch(*_real_run_args(checkout), runner=gcloud, fake_time=fake_time) == 0
  assert gcloud.steps() == ['create', 'delete'] * 5 + ['create', 'setup', 'train', 'describe', 'status']
  assert len({shlex.join(argv) for argv in gcloud.calls if argv[4] == 'create'}) == 1  # the same request
  assert fake_time.sleeps == [60, 120, 240, 480, 900, 7]
  err = capsys.readouterr().err.splitlines()
  retries = [line for line in err if 'no capacity' in line]
  assert retries[0] == ('us-central2-b has no capacity for v4-32 now (try 1); trying again in 60 s, for 24.0 h '
                        'more (--create_timeout)')
  assert retries[4] == ('us-central2-b has no capacity for v4-32 now (try 5); trying again in 15 min, for 23.8 h '
                        'more (--create_timeout)')
  assert len(retries) == 5 and err[-1] == f'training finished; results in {WORKDIR}'


def test_a_stock_out_that_outlasts_create_timeout_stops_with_one_line(checkout, capsys):
  gcloud = FakeGcloud(create_errors=[STOCK_OUT] * 10)
  fake_time = FakeTime()
  assert _launch(*_real_run_args(checkout, '--create_timeout=600'), runner=gcloud, fake_time=fake_time) == 1
  assert fake_time.sleeps == [60, 120, 240, 180]
  assert gcloud.steps() == ['create', 'delete'] * 4 + ['create']
  assert capsys.readouterr().err.splitlines()[-1] == (
      "error: step 'create' failed: gcloud exited 1: " + STOCK_OUT.strip() + ' (still no capacity after 5 tries '
      "in 10 min, --create_timeout; try another zone, or --queued to wait in Google's queue)")


def test_a_quota_error_is_not_a_stock_out(checkout, capsys):
  quota = ('ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: Quota limit '
           "'TPUV4sPreemptiblePodPerProjectPerZoneForTPUAPI' has been exceeded.\n")
  gcloud = FakeGcloud(create_errors=[quota])
  assert _launch(*_real_run_args(checkout), runner=gcloud) == 1
  assert gcloud.steps() == ['create']
  assert capsys.readouterr().err.splitlines()[-1] == f"error: step 'create' failed: gcloud exited 1: {quota.strip()}"


def test_a_queued_spot_slice_waits_in_the_queue_then_runs(checkout, capsys):
  gcloud = FakeGcloud(['READY'], [FINISHED], queued_states=['WAITING_FOR_RESOURCES'] * 3 + ['PROVISIONING', 'ACTIVE'])
  fake_time = FakeTime()
  assert _launch(*_real_run_args(checkout, '--queued'), runner=gcloud, fake_time=fake_time) == 0
  assert gcloud.steps() == ['create'] + ['describe'] * 5 + ['setup', 'train', 'describe', 'status']
  assert gcloud.calls[0][3:5] == ['queued-resources', 'create'] and '--spot' in gcloud.calls[0]
  assert fake_time.sleeps == [30, 30, 30, 30, 7]
  assert 'queued resource nf-f0: WAITING_FOR_RESOURCES; waiting (for 24.0 h more, --create_timeout)' in (
      capsys.readouterr().err.splitlines())


def test_a_queued_resource_stuck_waiting_for_resources_times_out(capsys):
  gcloud = FakeGcloud(queued_states=['WAITING_FOR_RESOURCES'] * 10)
  fake_time = FakeTime()
  assert _launch('create', '--name=nf-f0', f'--zone={ZONE}', '--accelerator_type=v6e-16', '--spot', '--queued',
                 '--create_timeout=100', runner=gcloud, fake_time=fake_time) == 1
  assert fake_time.sleeps == [30, 30, 30, 10]
  assert gcloud.steps() == ['create'] + ['describe'] * 5
  assert capsys.readouterr().err.splitlines()[-1] == (
      "error: step 'create' failed: queued resource nf-f0 is still WAITING_FOR_RESOURCES after 100 s "
      '(--create_timeout); it stays in the queue: run `watch` again to wait longer, or `delete --queued` to give up')


@pytest.mark.parametrize('state, advice', list(tpu_types.STUCK_ADVICE.items()) + [
    ('STARTING', 'see `gcloud compute tpus tpu-vm describe`')])
def test_watch_gives_up_on_a_slice_stuck_in_one_state(state, advice, checkout, capsys):
  gcloud = FakeGcloud(['READY'] + [state] * 20, [RUNNING])
  fake_time = FakeTime()
  assert _launch('watch', *_real_run_args(checkout, '--poll_seconds=120', '--stuck_timeout=600')[1:],
                 runner=gcloud, fake_time=fake_time) == 1
  # Found at the 2nd poll; it has been so for 600 s at the 7th.
  assert gcloud.steps() == ['describe', 'status'] + ['describe'] * 6
  assert 'delete' not in gcloud.steps()
  err = capsys.readouterr().err.splitlines()
  assert err[0] == f'nf-f0 is {state}; waiting (gives up after 10 min in one state, --stuck_timeout)'
  assert err[-1] == f"error: step 'watch' failed: nf-f0 has been {state} for 10 min (--stuck_timeout): {advice}"


def test_a_slice_that_leaves_a_stuck_state_in_time_is_watched_on(checkout, capsys):
  gcloud = FakeGcloud(['REPAIRING'] * 4 + ['READY', 'REPAIRING', 'READY'], [RUNNING, FINISHED])
  assert _launch('watch', *_real_run_args(checkout, '--poll_seconds=100', '--stuck_timeout=350')[1:],
                 runner=gcloud) == 0
  assert gcloud.steps() == ['describe'] * 5 + ['status', 'describe', 'describe', 'status']


def test_a_deleting_slice_counts_as_gone_once_deleted(checkout, capsys):
  gcloud = FakeGcloud(['DELETING', 'DELETING', None, 'READY'], [FINISHED])
  fake_time = FakeTime()
  assert _launch('watch', *_real_run_args(checkout)[1:], runner=gcloud, fake_time=fake_time) == 0
  assert gcloud.steps() == ['describe', 'describe', 'describe', 'delete', 'create', 'setup', 'train',
                            'describe', 'status']
  assert fake_time.sleeps == [7, 30, 7]
  err = capsys.readouterr().err
  assert 'nf-f0 is DELETING; waiting until it is gone' in err
  assert f'nf-f0 is gone: deleting and recreating it (1), then resuming from {WORKDIR}' in err


def test_watch_alone_follows_a_running_job_to_its_end(checkout, capsys):
  gcloud = FakeGcloud(['READY', 'READY'], [RUNNING, FINISHED])
  assert _launch('watch', *_real_run_args(checkout)[1:], runner=gcloud) == 0
  assert gcloud.steps() == ['describe', 'status', 'describe', 'status']
  assert 'training finished' in capsys.readouterr().err


def test_run_restarts_a_job_stopped_by_sigterm_and_reports_a_crash(checkout, capsys):
  gcloud = FakeGcloud(['READY', 'READY'], ['job w0 exited:0 final=0\n', 'job w0 exited:1 final=0\n'])
  assert _launch(*_real_run_args(checkout), runner=gcloud) == 1
  assert gcloud.steps() == ['create', 'setup', 'train', 'describe', 'status', 'train', 'describe', 'status']
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == "error: step 'watch' failed: training stopped on the workers (w0 exited:1); see " \
                    '`launch_tpu_pod logs`'


def test_a_failing_gcloud_call_stops_with_one_line(checkout, capsys):
  gcloud = FakeGcloud([], [], fail=('create', 'ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: no'))
  assert _launch(*_real_run_args(checkout), runner=gcloud) == 1
  assert gcloud.steps() == ['create']
  assert capsys.readouterr().err.splitlines()[-1] == (
      "error: step 'create' failed: gcloud exited 1: ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: no")


def test_run_gcloud_reports_a_missing_binary_and_keeps_stderr(tmp_path):
  assert tpu_launcher.run_gcloud([str(tmp_path / 'gcloud')], True).returncode == 127
  result = tpu_launcher.run_gcloud([sys.executable, '-c', 'import sys; sys.exit("quota exceeded")'], False)
  assert (result.returncode, result.stderr.strip()) == (1, 'quota exceeded')


TRAIN = ['train', '--config=configs/nfnet.py:F0']


@pytest.mark.parametrize('args, message', [
    ([*TRAIN, '--workdir=/tmp/f0'], 'must be a gs:// path'),
    (['train', '--config=configs/nope.py:F0', '--workdir=gs://b/f0'], "config file 'configs/nope.py' not found"),
    ([*TRAIN, '--workdir=gs://b/f0', '--override=seed=1'], 'must look like config.field=value'),
    (['delete', '--workdir=gs://b/f0'], '--workdir does not apply to `delete`'),
    (['delete', '--tunnel_through_iap'], '--tunnel_through_iap does not apply to `delete`'),
    (['create', '--accelerator_type=tpu-32'], "unknown TPU generation 'tpu'"),
    (['create', '--accelerator_type=v4_32'], 'not of the form'),
    (['create', '--accelerator_type=v4-8', '--spot', '--preemptible'], 'exclude each other'),
    (['logs', '--internal_ip', '--tunnel_through_iap'], '--internal_ip and --tunnel_through_iap exclude each other'),
    (['launch'], 'give one subcommand'),
    (['status', '--zonee=x'], 'bad command line'),
])
def test_bad_input_is_one_line(args, message, capsys):
  gcloud = FakeGcloud()
  assert _launch(*args, '--name=nf-f0', f'--zone={ZONE}', runner=gcloud) == 2
  assert not gcloud.calls
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err and err.count('\n') == 1, err


def test_tested_stack_prints_each_pair_for_shell_scripts():
  for end, stack in (('newest', tested_stack.NEWEST), ('oldest', tested_stack.OLDEST)):
    result = subprocess.run([sys.executable, '-m', 'scripts.tested_stack', end], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=True)
    assert result.stdout == f'{stack.python} {stack.jax}\n'
  assert tested_stack.min_python(tested_stack.NEWEST.jax) == '3.12'
  tested_stack.check_pair(tested_stack.OLDEST.python, tested_stack.OLDEST.jax)
  tested_stack.check_pair(tested_stack.NEWEST.python, tested_stack.NEWEST.jax)


def test_requirements_and_ci_cover_both_tested_ends():
  """The pins admit both tested pairs' JAX, and CI installs exactly those (it reads them from tested_stack)."""
  for stack in (tested_stack.OLDEST, tested_stack.NEWEST):
    tpu_launcher.check_jax_pin(os.path.join(REPO_ROOT, 'requirements.txt'), stack.jax)
  with open(os.path.join(REPO_ROOT, '.ci', 'run')) as f:
    ci = f.read()
  assert 'python3 -m scripts.tested_stack "$1"' in ci
  assert '"jax==$jax_version" "jaxlib==$jax_version"' in ci
  assert 'run_suite oldest' in ci and 'run_suite newest' in ci


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
  assert tpu_launcher.pack_code(str(repo), str(archive)) == 3
  with tarfile.open(archive) as tar:
    assert sorted(tar.getnames()) == ['.gitignore', 'configs/nfnet.py', 'local_edit.py']
