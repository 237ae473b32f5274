"""The gcloud command lines that run the trainer on a Cloud TPU slice, one function per step.

Every function returns argument lists, never shell strings: they are run with subprocess, printed with
`shlex.join`, and checked by tests as they are. The commands that run on the TPU workers are shell
scripts passed as one `--command=` argument; every value put into them is shell-quoted, so a config
override holding spaces or quotes reaches `experiments.train` on each worker unchanged.

On each worker (paths relative to the home directory, where `gcloud ... ssh` starts):
  nfnets/              the code (unpacked from nfnets-code.tar.gz, or a git clone)
  nfnets-venv/         the tested Python (scripts.tested_stack) with requirements.txt and the TPU build of JAX
  nfnets-train.log     the worker's training output; .pid and .exit hold its process id and exit status
"""
import dataclasses
import re
import shlex
from typing import Optional

from scripts import tested_stack
from scripts import tpu_types

CODE_DIR = 'nfnets'
CODE_TARBALL = 'nfnets-code.tar.gz'
VENV_DIR = 'nfnets-venv'
LOG_FILE = 'nfnets-train.log'
PID_FILE = 'nfnets-train.pid'
EXIT_FILE = 'nfnets-train.exit'


@dataclasses.dataclass(frozen=True)
class Pod:
  """A TPU slice: a TPU VM created directly, or through a queued resource (`queued=True`)."""
  name: str
  zone: str
  accelerator_type: str = ''
  runtime_version: str = ''        # '' picks default_runtime_version(accelerator_type)
  project: Optional[str] = None
  spot: bool = False
  preemptible: bool = False
  queued: bool = False
  queued_resource: str = ''        # the queued resource's id; '' uses the node's name
  # Private slices: no external IPs (create), a service account and its scopes (create), and how ssh/scp
  # reach the workers: their internal IPs (from inside the VPC) or an IAP tunnel (from anywhere).
  internal_ips: bool = False
  service_account: str = ''
  scopes: str = ''
  internal_ip: bool = False
  tunnel_through_iap: bool = False

  def __post_init__(self):
    if not re.fullmatch(r'[a-z]([-a-z0-9]*[a-z0-9])?', self.name or ''):
      raise ValueError(f'TPU name {self.name!r} must be lowercase letters, digits and hyphens, starting with a '
                       'letter')
    if not self.zone:
      raise ValueError('--zone is required, e.g. us-central2-b')
    if self.spot and self.preemptible:
      raise ValueError('--spot and --preemptible exclude each other')
    if self.queued and self.preemptible:
      raise ValueError('queued resources take --spot, not --preemptible')
    if self.internal_ip and self.tunnel_through_iap:
      raise ValueError('--internal_ip and --tunnel_through_iap exclude each other (gcloud takes one route)')
    if self.accelerator_type:
      tpu_types.check_accelerator_type(self.accelerator_type)

  @property
  def runtime(self) -> str:
    return self.runtime_version or tpu_types.default_runtime_version(self.accelerator_type)

  @property
  def queued_resource_id(self) -> str:
    return self.queued_resource or self.name

  def location_flags(self) -> list[str]:
    return [f'--zone={self.zone}'] + ([f'--project={self.project}'] if self.project else [])

  def create_access_flags(self) -> list[str]:
    return ((['--internal-ips'] if self.internal_ips else []) +
            ([f'--service-account={self.service_account}'] if self.service_account else []) +
            ([f'--scopes={self.scopes}'] if self.scopes else []))

  def ssh_words(self, verb: str) -> list[str]:
    """`gcloud ... tpu-vm ssh|scp` up to its arguments. gcloud offers --tunnel-through-iap for TPU VMs only
    in its alpha track (`gcloud alpha compute tpus tpu-vm ssh|scp`, the alpha component); --internal-ip is GA."""
    if self.tunnel_through_iap:
      return ['gcloud', 'alpha', 'compute', 'tpus', 'tpu-vm', verb]
    return _tpu('tpu-vm', verb)

  def route_flags(self) -> list[str]:
    return ['--tunnel-through-iap'] if self.tunnel_through_iap else ['--internal-ip'] if self.internal_ip else []


@dataclasses.dataclass(frozen=True)
class Code:
  """How the code reaches the workers: a git clone of `repo_url` at `repo_ref`, or else `local_dir` packed
  into `local_tarball` and copied with scp."""
  repo_url: Optional[str] = None
  repo_ref: str = 'main'
  local_dir: str = ''
  local_tarball: str = ''
  jax_version: str = tested_stack.NEWEST.jax
  python: str = tested_stack.NEWEST.python     # major.minor; the workers run `python<major.minor>`

  def __post_init__(self):
    if not re.fullmatch(r'\d+\.\d+\.\d+(\.\d+)?', self.jax_version):
      raise ValueError(f'--jax_version must be a JAX release such as {tested_stack.NEWEST.jax}, got '
                       f'{self.jax_version!r}')
    tested_stack.check_pair(self.python, self.jax_version)


@dataclasses.dataclass(frozen=True)
class Job:
  """The training command: a config spec `path:arg` relative to the code's root, a gs:// workdir and
  `--config.x=value` overrides passed through verbatim."""
  config: str
  workdir: str
  overrides: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.workdir.startswith('gs://') or len(self.workdir) <= len('gs://'):
      raise ValueError(f'--workdir must be a gs:// path (TPU VMs are deleted with their disks), got '
                       f'{self.workdir!r}')
    for override in self.overrides:
      if not override.startswith('--config.') or '=' not in override:
        raise ValueError(f'override {override!r} must look like config.field=value')

  def train_argv(self, python: str) -> list[str]:
    return [python, '-m', 'experiments.train', f'--config={self.config}', f'--workdir={self.workdir}',
            '--config.distributed=True', *self.overrides]


def _tpu(*words: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', *words]


def _ssh_all(pod: Pod, script: str) -> list[str]:
  return [*pod.ssh_words('ssh'), pod.name, *pod.location_flags(), '--worker=all', *pod.route_flags(),
          f'--command={script}']


def create_command(pod: Pod) -> list[str]:
  """Creates the slice (a queued resource request when `pod.queued`)."""
  if not pod.accelerator_type:
    raise ValueError('--accelerator_type is required to create a TPU, e.g. v4-32')
  if pod.queued:
    return _tpu('queued-resources', 'create', pod.queued_resource_id, *pod.location_flags(),
                f'--accelerator-type={pod.accelerator_type}', f'--runtime-version={pod.runtime}',
                f'--node-id={pod.name}', *(['--spot'] if pod.spot else []), *pod.create_access_flags())
  provisioning = ['--spot'] if pod.spot else ['--preemptible'] if pod.preemptible else []
  return _tpu('tpu-vm', 'create', pod.name, *pod.location_flags(), f'--accelerator-type={pod.accelerator_type}',
              f'--version={pod.runtime}', *provisioning, *pod.create_access_flags())


def node_state_command(pod: Pod) -> list[str]:
  """Prints the TPU VM's state (READY, CREATING, PREEMPTED, TERMINATED, ...); fails with NOT_FOUND when gone."""
  return _tpu('tpu-vm', 'describe', pod.name, *pod.location_flags(), '--format=value(state)')


def queued_state_command(pod: Pod) -> list[str]:
  """Prints the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, FAILED, ...)."""
  return _tpu('queued-resources', 'describe', pod.queued_resource_id, *pod.location_flags(),
              '--format=value(state.state)')


def delete_command(pod: Pod) -> list[str]:
  """Deletes the slice; for a queued resource `--force` deletes its node first."""
  if pod.queued:
    return _tpu('queued-resources', 'delete', pod.queued_resource_id, *pod.location_flags(), '--force',
                '--quiet')
  return _tpu('tpu-vm', 'delete', pod.name, *pod.location_flags(), '--quiet')


def copy_code_command(pod: Pod, code: Code) -> Optional[list[str]]:
  """Copies the packed local checkout to every worker; None when the workers clone a git repository."""
  if code.repo_url:
    return None
  return [*pod.ssh_words('scp'), code.local_tarball, f'{pod.name}:{CODE_TARBALL}', *pod.location_flags(),
          '--worker=all', *pod.route_flags()]


def setup_command(pod: Pod, code: Code) -> list[str]:
  """On every worker: unpack or clone the code; get Python `code.python` (the TPU VM images ship Python 3.10:
  from Ubuntu's archive if it has it, else from the deadsnakes PPA, apt running non-interactively so that
  Ubuntu 22.04's needrestart cannot stop it); check that Python's version before creating the venv, with one
  error line when it is missing or too old for the JAX asked for; install requirements.txt and
  `jax[tpu]==code.jax_version` into the venv."""
  if code.repo_url:
    fetch = (f'rm -rf {CODE_DIR} && git clone --quiet {shlex.quote(code.repo_url)} {CODE_DIR} && '
             f'git -C {CODE_DIR} checkout --quiet {shlex.quote(code.repo_ref)}')
  else:
    fetch = f'rm -rf {CODE_DIR} && mkdir {CODE_DIR} && tar -xzf {CODE_TARBALL} -C {CODE_DIR}'
  python = f'python{code.python}'
  packages = f'{python} {python}-venv'
  minimum = tested_stack.min_python(code.jax_version)
  version_ok = (f"{python} -c 'import ensurepip, sys; "
                f"sys.exit(sys.version_info[:2] < {tuple(int(p) for p in minimum.split('.'))})'")
  # The image's unattended upgrades may hold the dpkg lock for a while; sudo drops the caller's environment,
  # hence `env` for the non-interactive settings.
  apt = ('sudo env DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a apt-get -o DPkg::Lock::Timeout=600 -qq')
  from_ppa = ('{ sudo env DEBIAN_FRONTEND=noninteractive add-apt-repository -y ppa:deadsnakes/ppa > /dev/null && '
              f'{apt} update && {apt} install -y {packages} > /dev/null; }}')
  pip = f'{VENV_DIR}/bin/pip install -q'
  steps = [
      fetch,
      f'if ! {version_ok} 2> /dev/null; then {apt} update && '
      f'{{ {apt} install -y {packages} > /dev/null 2>&1 || {from_ppa}; }} || true; fi',
      f'if ! {version_ok} 2> /dev/null; then echo "$(hostname): Python {code.python} (>= {minimum} for jax '
      f'{code.jax_version}) with venv is missing: apt could not install {packages}, from Ubuntu or '
      f'ppa:deadsnakes/ppa" >&2; exit 1; fi',
      f'rm -rf {VENV_DIR} && {python} -m venv {VENV_DIR}',
      f'{pip} --upgrade pip',
      f'{pip} -r {CODE_DIR}/requirements.txt {shlex.quote(f"jax[tpu]=={code.jax_version}")}',
  ]
  return _ssh_all(pod, ' && '.join(steps))


def _job_running_test() -> str:
  return f'[ -f {PID_FILE} ] && kill -0 "$(cat {PID_FILE})" 2>/dev/null'


def train_command(pod: Pod, job: Job) -> list[str]:
  """Starts the same training command on every worker at once, detached from the ssh session (setsid,
  nohup), output to the worker's own log; refuses to start a second job next to a running one.

  A small bash wrapper records the trainer's process id and, once it ends, its exit status. The wrapper
  ignores SIGTERM so that the status is written even when the trainer is stopped by SIGTERM (it then
  checkpoints and exits); the trainer itself keeps the default disposition.
  """
  python = f'../{VENV_DIR}/bin/python'
  wrapper = (f'{shlex.join(job.train_argv(python))} > ../{LOG_FILE} 2>&1 < /dev/null & '
             f'echo $! > ../{PID_FILE}; trap "" TERM; wait $!; echo $? > ../{EXIT_FILE}')
  script = (f'if {_job_running_test()}; then echo "$(hostname): a training job is already running" >&2; '
            f'exit 1; fi; rm -f {EXIT_FILE} {PID_FILE}; cd {CODE_DIR} || exit 1; '
            f'setsid nohup bash -c {shlex.quote(wrapper)} > /dev/null 2>&1 < /dev/null &')
  return _ssh_all(pod, script)


def job_status_command(pod: Pod) -> list[str]:
  """Each worker prints `job <host> <running|exited:<status>|none> final=<0|1>`; final=1 when its log holds
  the trainer's closing `final:` line (only the primary host prints it). See `parse_job_status`."""
  # The exit file is written last and removed at each start: it wins over a process still closing down.
  script = (f'if [ -f {EXIT_FILE} ]; then s="exited:$(cat {EXIT_FILE})"; elif {_job_running_test()}; then '
            's=running; else s=none; fi; f=0; '
            f"grep -q '^final: ' {LOG_FILE} 2>/dev/null && f=1; "
            'echo "job $(hostname) $s final=$f"')
  return _ssh_all(pod, script)


@dataclasses.dataclass(frozen=True)
class WorkerJob:
  host: str
  state: str          # 'running', 'exited:<status>' or 'none'
  final: bool


def parse_job_status(output: str) -> list[WorkerJob]:
  """The workers' lines of `job_status_command`, ignoring anything else ssh printed."""
  jobs = []
  for line in output.splitlines():
    match = re.fullmatch(r'job (\S+) (running|exited:-?\d+|none) final=([01])', line.strip())
    if match:
      jobs.append(WorkerJob(match.group(1), match.group(2), match.group(3) == '1'))
  return jobs


def logs_command(pod: Pod, lines: int = 50, follow: bool = False) -> list[str]:
  """The end of every worker's training log, each line prefixed with the worker's host name."""
  tail = f'tail -n {int(lines)}' + (' -F' if follow else '')
  return _ssh_all(pod, f'{tail} {LOG_FILE} | sed -u "s/^/$(hostname): /"')
