"""The TPU pod launcher's steps (create, setup, train, watch, ...) over a gcloud runner that tests replace.

Waiting is done with an injected `sleep` and `clock`, so tests run the stock-out retries and the stuck-state
timeouts without real time passing. Every wait is said in the log (stderr).
"""
import collections
import dataclasses
import itertools
import os
import shlex
import subprocess
import sys
import tarfile
import time
from typing import Callable, Optional

from packaging import requirements

from scripts import tpu_pod
from scripts import tpu_types

# Stock-out retries wait 1 min, then twice as long each time, at most 15 min.
FIRST_RETRY_SECONDS = 60
MAX_RETRY_SECONDS = 900


class LaunchError(Exception):
  """A step failed; printed as one line."""


class StockOut(LaunchError):
  """The zone has no capacity for the slice now."""


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


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 120:
    return f'{seconds} s'
  if seconds < 7200:
    return f'{seconds // 60} min'
  return f'{seconds / 3600:.1f} h'


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


def check_jax_pin(requirements_file: str, jax_version: str) -> None:
  """Refuses a JAX version that the code's requirements.txt excludes (for jax, or for jaxlib, which
  jax[tpu] pins to the same release): pip on the workers would fail on the conflict after minutes of
  installing, on every worker."""
  try:
    with open(requirements_file) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise LaunchError(f"step 'setup' failed: cannot read {requirements_file}: {e.strerror}") from e
  for line in lines:
    line = line.split('#')[0].strip()
    if not line or line.startswith('-'):
      continue
    try:
      requirement = requirements.Requirement(line)
    except requirements.InvalidRequirement:
      continue  # not a package pin (e.g. a URL); pip on the workers judges it
    if requirement.name in ('jax', 'jaxlib') and not requirement.specifier.contains(jax_version,
                                                                                    prereleases=True):
      raise LaunchError(f"step 'setup' failed: jax {jax_version} is outside {requirements_file}'s "
                        f'{requirement.name} pin {requirement.specifier}; pass a --jax_version inside it')


class Launcher:
  """The subcommands, over a command runner that tests replace by a fake."""

  def __init__(self, pod: tpu_pod.Pod, *, runner: Runner = run_gcloud, dry_run: bool = False,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
               say: Optional[Callable[[str], None]] = None, create_timeout: float = 24 * 3600,
               stuck_timeout: float = 3600, queue_poll_seconds: float = 30):
    self.pod = pod
    self._runner = runner
    self._dry_run = dry_run
    self._sleep = sleep
    self._clock = clock
    self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    self._create_timeout = create_timeout
    self._stuck_timeout = stuck_timeout
    self._queue_poll_seconds = queue_poll_seconds

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
      error = StockOut if step == 'create' and tpu_types.is_stock_out(result.stderr) else LaunchError
      raise error(f"step '{step}' failed: {argv[0]} exited {result.returncode}: {_error_line(result.stderr)}")
    return result

  def create(self) -> None:
    """Creates the slice; while the zone has no capacity, tries again with growing pauses until
    --create_timeout has passed since the first try."""
    deadline = self._clock() + self._create_timeout
    pause = FIRST_RETRY_SECONDS
    for attempt in itertools.count(1):
      try:
        self._call('create', tpu_pod.create_command(self.pod))
        break
      except StockOut as e:
        left = deadline - self._clock()
        if left <= 0:
          raise LaunchError(f'{e} (still no capacity after {attempt} tries in {_duration(self._create_timeout)}, '
                            '--create_timeout; try another zone, or --queued to wait in Google\'s queue)') from e
        wait = min(pause, left)
        self._say(f'{self.pod.zone} has no capacity for {self.pod.accelerator_type} now (try {attempt}); '
                  f'trying again in {_duration(wait)}, for {_duration(left)} more (--create_timeout)')
        self.delete()  # a failed create can leave a node behind, which would block the next one
        self._sleep(wait)
        pause = min(2 * pause, MAX_RETRY_SECONDS)
    if self.pod.queued:
      self._wait_until_active(deadline)

  def _wait_until_active(self, deadline: float) -> None:
    while True:
      result = self._call('create', tpu_pod.queued_state_command(self.pod), capture=True)
      state = result.stdout.strip()
      if self._dry_run or state == 'ACTIVE':
        return
      name = f'queued resource {self.pod.queued_resource_id}'
      if state in tpu_types.QUEUED_DEAD_STATES:
        raise LaunchError(f"step 'create' failed: {name} is {state}")
      left = deadline - self._clock()
      if left <= 0:
        raise LaunchError(f"step 'create' failed: {name} is still {state or '?'} after "
                          f'{_duration(self._create_timeout)} (--create_timeout); it stays in the queue: run '
                          '`watch` again to wait longer, or `delete --queued` to give up')
      self._say(f'{name}: {state or "?"}; waiting (for {_duration(left)} more, --create_timeout)')
      self._sleep(min(self._queue_poll_seconds, left))

  def setup(self, code: tpu_pod.Code) -> None:
    if not code.repo_url:
      check_jax_pin(os.path.join(code.local_dir, 'requirements.txt'), code.jax_version)
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

  def _recreate(self, code: tpu_pod.Code, job: tpu_pod.Job) -> None:
    self.delete()
    self.create()
    self.setup(code)
    self.train(job)

  def watch(self, code: tpu_pod.Code, job: tpu_pod.Job, *, poll_seconds: float, max_recreations: int) -> None:
    """Polls the slice and the job until the job finishes; a preempted or vanished slice is deleted,
    recreated and set up, and `job` started again (it resumes from its workdir). A slice that stays in
    another state than READY for --stuck_timeout stops the watch with advice."""
    recreations = 0
    ssh_failures = 0
    unready_since = None   # (state, clock) of the first poll that found the slice not READY
    while True:
      if not self._dry_run:
        self._sleep(poll_seconds)
      state = self.node_state('watch')
      if state is None or state in tpu_types.PREEMPTED_STATES or state in tpu_types.GONE_STATES:
        recreations += 1
        if recreations > max_recreations:
          raise LaunchError(f"step 'watch' failed: {self.pod.name} was lost {recreations} times; giving up")
        if state in tpu_types.GONE_STATES:
          self._say(f'{self.pod.name} is {state}; waiting until it is gone')
          self._wait_until_gone()
          state = None
        self._say(f'{self.pod.name} is {state or "gone"}: deleting and recreating it '
                  f'({recreations}), then resuming from {job.workdir}')
        self._recreate(code, job)
        unready_since = None
        continue
      if state != 'READY' and not self._dry_run:
        if unready_since is None or unready_since[0] != state:
          unready_since = (state, self._clock())
        waited = self._clock() - unready_since[1]
        if waited >= self._stuck_timeout:
          advice = tpu_types.STUCK_ADVICE.get(state, 'see `gcloud compute tpus tpu-vm describe`')
          raise LaunchError(f"step 'watch' failed: {self.pod.name} has been {state} for {_duration(waited)} "
                            f'(--stuck_timeout): {advice}')
        self._say(f'{self.pod.name} is {state}; waiting (gives up after {_duration(self._stuck_timeout)} '
                  f'in one state, --stuck_timeout)')
        continue
      unready_since = None
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

  def _wait_until_gone(self) -> None:
    """Waits (up to --stuck_timeout) for a DELETING slice to disappear, so that it can be created again."""
    deadline = self._clock() + self._stuck_timeout
    while self.node_state('watch') is not None:
      if self._clock() >= deadline:
        raise LaunchError(f"step 'watch' failed: {self.pod.name} has been DELETING for "
                          f'{_duration(self._stuck_timeout)} (--stuck_timeout); see `gcloud compute tpus tpu-vm '
                          'describe`')
      self._sleep(self._queue_poll_seconds)
