"""Trains on a Cloud TPU slice from your machine: create it, install, start, watch, recreate after preemption.

  python -m scripts.launch_tpu_pod SUBCOMMAND --name NAME --zone ZONE [flags]

  create   --accelerator_type v4-32 [--runtime_version V] [--spot | --preemptible] [--queued]
  setup    ships the code (a tarball of --local_dir, default this checkout, or --repo_url at --repo_ref)
           and installs requirements.txt and jax[tpu]==--jax_version on every worker
  train    --config configs/nfnet.py:F0 --workdir gs://bucket/f0 [--override config.x=value ...]:
           starts experiments.train with --config.distributed=True on all workers, detached
  logs     [--lines 50] [--follow]: the end of each worker's log
  status   the TPU's state (and the queued resource's) and each worker's job
  delete   deletes the TPU (the queued resource, with --queued)
  run      create, setup and train, then watch: a preempted slice is deleted, recreated, set up and the
           same command started again, which resumes from the workdir's latest checkpoint
  watch    the watching part of `run` alone (same flags), e.g. after the machine running `run` stopped

Every subcommand takes --name, --zone, [--project], [--queued [--queued_resource ID]] and --dry-run,
which prints each gcloud command (shell-quoted, one per line) instead of running it. Flags may be
spelt with hyphens or underscores. A failing gcloud call stops with one line naming the step.
"""
import collections
import dataclasses
import functools
import importlib.metadata
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Optional

from absl import flags

from scripts import tpu_pod

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_POD_FLAGS = ('name', 'zone', 'project', 'queued', 'queued_resource', 'dry_run')
_CREATE_FLAGS = ('accelerator_type', 'runtime_version', 'spot', 'preemptible')
_SETUP_FLAGS = ('repo_url', 'repo_ref', 'local_dir', 'jax_version', 'python')
_TRAIN_FLAGS = ('config', 'override', 'workdir')
SUBCOMMAND_FLAGS = {
    'create': _POD_FLAGS + _CREATE_FLAGS,
    'setup': _POD_FLAGS + _SETUP_FLAGS,
    'train': _POD_FLAGS + _TRAIN_FLAGS,
    'logs': _POD_FLAGS + ('lines', 'follow'),
    'status': _POD_FLAGS,
    'delete': _POD_FLAGS,
    'run': _POD_FLAGS + _CREATE_FLAGS + _SETUP_FLAGS + _TRAIN_FLAGS + ('poll_seconds', 'max_recreations'),
}
SUBCOMMAND_FLAGS['watch'] = SUBCOMMAND_FLAGS['run']

# A FlagValues of its own: other commands' absl flags (the trainer's --config, --workdir) never clash with it.
FLAGS = flags.FlagValues()
_string = functools.partial(flags.DEFINE_string, flag_values=FLAGS)
_bool = functools.partial(flags.DEFINE_bool, flag_values=FLAGS)
_integer = functools.partial(flags.DEFINE_integer, flag_values=FLAGS)

_string('name', None, 'TPU VM name (the queued resource\'s node id with --queued).')
_string('zone', None, 'Zone, e.g. us-central2-b.')
_string('project', None, 'Google Cloud project; default: gcloud\'s configured project.')
_bool('queued', False, 'Create and delete the slice through a queued resource.')
_string('queued_resource', None, 'Queued resource id; default: --name.')
_bool('dry_run', False, 'Print the gcloud commands instead of running them.')
_string('accelerator_type', None, 'e.g. v4-8 (one host), v4-32 (four hosts), v5litepod-16.')
_string('runtime_version', None, 'TPU software version; default: Google\'s JAX runtime for the '
        'accelerator\'s generation (tpu-ubuntu2204-base up to v4).')
_bool('spot', False, 'Spot slice (cheaper; may be preempted at any time).')
_bool('preemptible', False, 'Preemptible slice (the older preemptible model).')
_string('repo_url', None, 'Git URL the workers clone; default: ship --local_dir instead.')
_string('repo_ref', 'main', 'Branch, tag or commit to check out with --repo_url.')
_string('local_dir', REPO_ROOT, 'Checkout to pack and copy to the workers (git-tracked and '
        'untracked, not ignored, files).')
_string('jax_version', None, 'jax[tpu] version to install; default: the local jax version.')
_string('python', 'python3.11', 'Python on the workers (installed with apt).')
_string('config', None, 'Config spec path:arg relative to the code root, e.g. configs/nfnet.py:F0.')
flags.DEFINE_multi_string('override', [], 'A config override config.x=value (repeatable), passed verbatim.',
                          flag_values=FLAGS)
_string('workdir', None, 'gs:// directory for checkpoints and logs (resumed if it holds a run).')
_integer('lines', 50, 'Lines of each worker\'s log to show.')
_bool('follow', False, 'Keep printing the logs as they grow.')
_integer('poll_seconds', 120, 'Seconds between checks while `run` watches the job.')
_integer('max_recreations', 100, '`run` gives up after recreating the slice this many times.')


class LaunchError(Exception):
  """A step failed; printed as one line."""


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str = ''
  stderr: str = ''


Runner = Callable[[list[str], bool], Result]


def run_gcloud(argv: list[str], capture: bool) -> Result:
  """Runs a command; its stderr is shown as it comes (and kept), stdout is shown or, if `capture`, returned."""
  try:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE,
                               text=True)
  except FileNotFoundError:
    return Result(127, stderr=f'{argv[0]} not found; install the Google Cloud CLI (gcloud)')
  if capture:
    stdout, stderr = process.communicate()
    return Result(process.returncode, stdout, stderr)
  tail = collections.deque(maxlen=20)
  for line in process.stderr:
    sys.stderr.write(line)
    tail.append(line)
  return Result(process.wait(), stderr=''.join(tail))


def _error_line(stderr: str) -> str:
  """gcloud's `ERROR: (gcloud.<command>) <reason>` line (advice follows it), else the last line."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith('ERROR:')]
  return (errors or lines or ['(no error output)'])[-1]


def pack_code(local_dir: str, destination: str) -> int:
  """Writes a .tar.gz of the checkout: git's tracked and untracked-but-not-ignored files, so local edits
  travel and runs/, caches and virtual environments do not. Returns the number of files."""
  try:
    listing = subprocess.run(['git', '-C', local_dir, 'ls-files', '-z', '--cached', '--others',
                              '--exclude-standard'], capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise LaunchError(f"step 'setup' failed: {local_dir} is not a git checkout; use --repo_url") from e
  files = [name for name in listing.decode().split('\0')
           if name and os.path.isfile(os.path.join(local_dir, name))]
  with tarfile.open(destination, 'w:gz') as tar:
    for name in files:
      tar.add(os.path.join(local_dir, name), arcname=name)
  return len(files)


class Launcher:
  """The subcommands, over a command runner that tests replace by a fake."""

  def __init__(self, pod: tpu_pod.Pod, *, runner: Runner = run_gcloud, dry_run: bool = False,
               sleep: Callable[[float], None] = time.sleep, say: Optional[Callable[[str], None]] = None):
    self.pod = pod
    self._runner = runner
    self._dry_run = dry_run
    self._sleep = sleep
    self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))

  def _call(self, step: str, argv: list[str], *, capture: bool = False,
            not_found_ok: bool = False) -> Optional[Result]:
    """Runs one gcloud command; None if it failed with NOT_FOUND and `not_found_ok`."""
    if self._dry_run:
      print(shlex.join(argv), flush=True)
      return Result(0)
    result = self._runner(argv, capture)
    if result.returncode != 0:
      if not_found_ok and 'NOT_FOUND' in result.stderr:
        return None
      raise LaunchError(f"step '{step}' failed: {argv[0]} exited {result.returncode}: "
                        f'{_error_line(result.stderr)}')
    return result

  def create(self) -> None:
    self._call('create', tpu_pod.create_command(self.pod))
    if self.pod.queued:
      self._wait_until_active()

  def _wait_until_active(self, poll_seconds: float = 30) -> None:
    while True:
      result = self._call('create', tpu_pod.queued_state_command(self.pod), capture=True)
      state = result.stdout.strip()
      if self._dry_run or state == 'ACTIVE':
        return
      if state in tpu_pod.QUEUED_DEAD_STATES:
        raise LaunchError(f"step 'create' failed: queued resource {self.pod.queued_resource_id} is {state}")
      self._say(f'queued resource {self.pod.queued_resource_id}: {state or "?"}; waiting')
      self._sleep(poll_seconds)

  def setup(self, code: tpu_pod.Code) -> None:
    copy = tpu_pod.copy_code_command(self.pod, code)
    if copy is not None:
      if self._dry_run:
        self._call('setup', copy)
      else:
        count = pack_code(code.local_dir, code.local_tarball)
        self._say(f'packed {count} files of {code.local_dir} into {code.local_tarball}')
        try:
          self._call('setup', copy)
        finally:
          os.remove(code.local_tarball)
    self._call('setup', tpu_pod.setup_command(self.pod, code))

  def train(self, job: tpu_pod.Job) -> None:
    self._call('train', tpu_pod.train_command(self.pod, job))
    self._say(f'training started on every worker of {self.pod.name}; logs: launch_tpu_pod logs')

  def logs(self, lines: int, follow: bool) -> None:
    self._call('logs', tpu_pod.logs_command(self.pod, lines, follow))

  def delete(self) -> None:
    self._call('delete', tpu_pod.delete_command(self.pod), not_found_ok=True)

  def node_state(self, step: str) -> Optional[str]:
    """The TPU VM's state, or None once it no longer exists."""
    result = self._call(step, tpu_pod.node_state_command(self.pod), capture=True, not_found_ok=True)
    return None if result is None else result.stdout.strip()

  def job_states(self, step: str) -> list[tpu_pod.WorkerJob]:
    result = self._call(step, tpu_pod.job_status_command(self.pod), capture=True)
    return tpu_pod.parse_job_status(result.stdout)

  def status(self) -> None:
    if self.pod.queued:
      result = self._call('status', tpu_pod.queued_state_command(self.pod), capture=True, not_found_ok=True)
      print(f'queued resource {self.pod.queued_resource_id}: '
            f'{"not found" if result is None else result.stdout.strip()}')
    state = self.node_state('status')
    print(f'tpu {self.pod.name}: {state if state is not None else "not found"}')
    if state == 'READY' or self._dry_run:
      for job in self.job_states('status'):
        print(f'  {job.host}: {job.state}{" (finished)" if job.final else ""}')

  def run(self, code: tpu_pod.Code, job: tpu_pod.Job, *, poll_seconds: float, max_recreations: int) -> None:
    """create, setup, train; then watch until the job finishes, recreating the slice when it is preempted."""
    self.create()
    self.setup(code)
    self.train(job)
    self.watch(code, job, poll_seconds=poll_seconds, max_recreations=max_recreations)

  def watch(self, code: tpu_pod.Code, job: tpu_pod.Job, *, poll_seconds: float, max_recreations: int) -> None:
    """Polls the slice and the job until the job finishes; a preempted or vanished slice is deleted,
    recreated and set up, and `job` started again (it resumes from its workdir)."""
    recreations = 0
    ssh_failures = 0
    while True:
      if not self._dry_run:
        self._sleep(poll_seconds)
      state = self.node_state('watch')
      if state is None or state in tpu_pod.PREEMPTED_STATES:
        recreations += 1
        if recreations > max_recreations:
          raise LaunchError(f"step 'watch' failed: {self.pod.name} was lost {recreations} times; giving up")
        self._say(f'{self.pod.name} is {state or "gone"}: deleting and recreating it '
                  f'({recreations}), then resuming from {job.workdir}')
        self.delete()
        self.create()
        self.setup(code)
        self.train(job)
        continue
      if state != 'READY' and not self._dry_run:
        self._say(f'{self.pod.name} is {state}; waiting')
        continue
      try:
        workers = self.job_states('watch')
      except LaunchError:
        ssh_failures += 1  # a worker may be going down; the next state check tells
        if ssh_failures >= 5:
          raise
        continue
      ssh_failures = 0
      if self._dry_run:
        self._say(f'(dry run: the two commands above are repeated every {poll_seconds:g} s)')
        return
      if any(w.state == 'running' for w in workers):
        continue
      if any(w.final for w in workers):
        self._say(f'training finished; results in {job.workdir}')
        return
      if workers and all(w.state == 'exited:0' for w in workers):
        # The trainer checkpoints and exits 0 on SIGTERM (e.g. a maintenance event) without finishing.
        self._say('the job stopped before the end (SIGTERM); starting it again to resume')
        self.train(job)
        continue
      failed = [f'{w.host} {w.state}' for w in workers if w.state != 'exited:0'] or ['no job found']
      raise LaunchError(f"step 'watch' failed: training stopped on the workers ({', '.join(failed)}); "
                        'see `launch_tpu_pod logs`')


class UsageError(Exception):
  """Bad flags or subcommand; printed as one line, exit status 2."""


def _normalise_flag_names(argv: list[str]) -> list[str]:
  """Accepts gcloud-style `--dry-run` for `--dry_run`, for this command's own flags only."""
  result = []
  for arg in argv:
    name, sep, value = arg.partition('=')
    underscored = name[2:].replace('-', '_')
    if arg.startswith('--') and '-' in name[2:] and underscored.removeprefix('no') in FLAGS:
      arg = f'--{underscored}{sep}{value}'
    result.append(arg)
  return result


def _code() -> tpu_pod.Code:
  try:
    jax_version = FLAGS.jax_version or importlib.metadata.version('jax')
  except importlib.metadata.PackageNotFoundError:
    jax_version = ''
  tarball = os.path.join(tempfile.gettempdir(), f'nfnets-code-{FLAGS.name}.tar.gz')
  return tpu_pod.Code(repo_url=FLAGS.repo_url, repo_ref=FLAGS.repo_ref, local_dir=FLAGS.local_dir,
                      local_tarball=tarball, jax_version=jax_version, python=FLAGS.python)


def _job() -> tpu_pod.Job:
  """The training job; the config file must exist in the code that is shipped (it is not loaded here)."""
  if not FLAGS.config:
    raise UsageError('--config is required, e.g. configs/nfnet.py:F0')
  if not FLAGS.workdir:
    raise UsageError('--workdir is required, e.g. gs://bucket/f0')
  path, sep, arg = FLAGS.config.partition(':')
  root = os.path.abspath(FLAGS.local_dir)
  full = os.path.abspath(os.path.join(root, path))
  if not os.path.isfile(full) or os.path.relpath(full, root).startswith('..'):
    raise UsageError(f'config file {path!r} not found in {root} (give it relative to the code\'s root)')
  overrides = tuple('--' + override.lstrip('-') for override in FLAGS.override)
  return tpu_pod.Job(config=os.path.relpath(full, root) + sep + arg, workdir=FLAGS.workdir, overrides=overrides)


def _pod() -> tpu_pod.Pod:
  if not FLAGS.name:
    raise UsageError('--name is required')
  return tpu_pod.Pod(name=FLAGS.name, zone=FLAGS.zone or '', accelerator_type=FLAGS.accelerator_type or '',
                     runtime_version=FLAGS.runtime_version or '', project=FLAGS.project, spot=FLAGS.spot,
                     preemptible=FLAGS.preemptible, queued=FLAGS.queued,
                     queued_resource=FLAGS.queued_resource or '')


def _parse(argv: list[str]) -> str:
  """Parses the command line into FLAGS and returns the subcommand."""
  FLAGS.unparse_flags()
  try:
    positional = FLAGS(_normalise_flag_names(list(argv)))[1:]
  except flags.Error as e:
    raise UsageError(f'bad command line: {e}') from e
  if len(positional) != 1 or positional[0] not in SUBCOMMAND_FLAGS:
    raise UsageError(f'give one subcommand of {", ".join(SUBCOMMAND_FLAGS)} '
                     f'(got {" ".join(positional) or "none"})')
  subcommand = positional[0]
  for name in FLAGS:
    if FLAGS[name].present and name not in SUBCOMMAND_FLAGS[subcommand]:
      raise UsageError(f'--{name} does not apply to `{subcommand}`')
  return subcommand


def main(argv: list[str], *, runner: Runner = run_gcloud, sleep: Callable[[float], None] = time.sleep) -> int:
  """Runs `launch_tpu_pod SUBCOMMAND --flags` (argv[0] is the program name); returns the exit status."""
  if any(arg in ('-h', '--help', '--helpfull') for arg in argv[1:]):
    print(__doc__)
    print(FLAGS.get_help())
    return 0
  try:
    subcommand = _parse(argv)
    pod = _pod()
    job = _job() if subcommand in ('train', 'run', 'watch') else None
    if subcommand in ('create', 'run', 'watch'):
      tpu_pod.create_command(pod)  # checks the accelerator type before anything runs
  except (UsageError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  launcher = Launcher(pod, runner=runner, dry_run=FLAGS.dry_run, sleep=sleep)
  try:
    if subcommand == 'create':
      launcher.create()
    elif subcommand == 'setup':
      launcher.setup(_code())
    elif subcommand == 'train':
      launcher.train(job)
    elif subcommand == 'logs':
      launcher.logs(FLAGS.lines, FLAGS.follow)
    elif subcommand == 'status':
      launcher.status()
    elif subcommand == 'delete':
      launcher.delete()
    else:
      getattr(launcher, subcommand)(_code(), job, poll_seconds=FLAGS.poll_seconds,
                                    max_recreations=FLAGS.max_recreations)
  except (LaunchError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
