"""Trains on a Cloud TPU slice from your machine: create it, install, start, watch, recreate after preemption.

  python -m scripts.launch_tpu_pod SUBCOMMAND --name NAME --zone ZONE [flags]

  create   --accelerator_type v4-32 [--runtime_version V] [--spot [--queued] | --preemptible]
           [--create_timeout S]; private slices: [--internal_ips] [--service_account SA] [--scopes S]
  setup    ships the code (a tarball of --local_dir, default this checkout, or --repo_url at --repo_ref)
           and installs Python --python, requirements.txt and jax[tpu]==--jax_version on every worker
           (default: the newest Python/JAX pair the project tests, scripts/tested_stack.py)
  train    --config configs/nfnet.py:F0 --workdir gs://bucket/f0 [--override config.x=value ...]:
           starts experiments.train with --config.distributed=True on all workers, detached
  logs     [--lines 50] [--follow]: the end of each worker's log
  status   the TPU's state (and the queued resource's) and each worker's job
  delete   deletes the TPU (the queued resource, with --queued)
  run      create, setup and train, then watch: a preempted slice is deleted, recreated, set up and the
           same command started again, which resumes from the workdir's latest checkpoint
  watch    the watching part of `run` alone (same flags), e.g. after the machine running `run` stopped

Every subcommand takes --name, --zone, [--project], [--queued [--queued_resource ID]] and --dry-run,
which prints each gcloud command (shell-quoted, one per line) instead of running it; those that ssh to
the workers take --internal_ip or --tunnel_through_iap for workers without external IPs. Flags may be
spelt with hyphens or underscores. A failing gcloud call stops with one line naming the step, except a
create that finds no capacity in the zone: it is tried again, with growing pauses, until --create_timeout.
A slice stuck in one state other than READY (REPAIRING, STOPPED, UNKNOWN, ...) stops `watch` after
--stuck_timeout, with advice. Details: docs/tpu_pods.md.
"""
import functools
import importlib.metadata
import os
import sys
import tempfile
import time
from typing import Callable, Optional

from absl import flags

from scripts import tested_stack
from scripts import tpu_launcher
from scripts import tpu_pod

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_POD_FLAGS = ('name', 'zone', 'project', 'queued', 'queued_resource', 'dry_run')
_SSH_FLAGS = ('internal_ip', 'tunnel_through_iap')
_CREATE_FLAGS = ('accelerator_type', 'runtime_version', 'spot', 'preemptible', 'create_timeout', 'internal_ips',
                 'service_account', 'scopes')
_SETUP_FLAGS = ('repo_url', 'repo_ref', 'local_dir', 'jax_version', 'python')
_TRAIN_FLAGS = ('config', 'override', 'workdir')
SUBCOMMAND_FLAGS = {
    'create': _POD_FLAGS + _CREATE_FLAGS,
    'setup': _POD_FLAGS + _SSH_FLAGS + _SETUP_FLAGS,
    'train': _POD_FLAGS + _SSH_FLAGS + _TRAIN_FLAGS,
    'logs': _POD_FLAGS + _SSH_FLAGS + ('lines', 'follow'),
    'status': _POD_FLAGS + _SSH_FLAGS,
    'delete': _POD_FLAGS,
    'run': (_POD_FLAGS + _SSH_FLAGS + _CREATE_FLAGS + _SETUP_FLAGS + _TRAIN_FLAGS +
            ('poll_seconds', 'max_recreations', 'stuck_timeout')),
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
_bool('queued', False, 'Create and delete the slice through a queued resource: the request waits in '
      'Google\'s queue (WAITING_FOR_RESOURCES) until there is capacity, instead of failing. The easy way '
      'to get a --spot slice.')
_string('queued_resource', None, 'Queued resource id; default: --name.')
_bool('dry_run', False, 'Print the gcloud commands instead of running them.')
_string('accelerator_type', None, 'e.g. v4-8 (one host), v4-32 (four hosts), v5litepod-16 (v5e), v6e-16.')
_string('runtime_version', None, 'TPU software version; default: Google\'s JAX runtime for the '
        'accelerator\'s generation (tpu-ubuntu2204-base up to v4).')
_bool('spot', False, 'Spot slice: cheaper, may be preempted at any time, no run-time limit. Add --queued '
      'to wait in Google\'s queue for capacity.')
_bool('preemptible', False, 'Preemptible slice (the older model): stopped after at most 24 hours, even '
      'if not preempted before. Prefer --spot, which has no such limit and costs the same.')
_integer('create_timeout', 24 * 3600, 'Seconds to keep trying to get the slice: a create that finds no '
         'capacity in the zone is retried with growing pauses (1 to 15 min), and a queued resource may wait '
         'this long to become ACTIVE.')
_bool('internal_ips', False, 'Create the workers without external IPs (then reach them with '
      '--tunnel_through_iap or --internal_ip; pip needs Cloud NAT).')
_string('service_account', None, 'Service account the workers run as (it writes the gs:// workdir); '
        'default: the Compute Engine default service account.')
_string('scopes', None, 'Comma-separated OAuth scopes for --service_account, e.g. cloud-platform.')
_bool('internal_ip', False, 'ssh/scp to the workers\' internal IPs (from a machine in the same VPC).')
_bool('tunnel_through_iap', False, 'ssh/scp to the workers through an IAP tunnel (needs gcloud\'s alpha '
      'component and a firewall rule allowing tcp:22 from 35.235.240.0/20).')
_string('repo_url', None, 'Git URL the workers clone; default: ship --local_dir instead.')
_string('repo_ref', 'main', 'Branch, tag or commit to check out with --repo_url.')
_string('local_dir', REPO_ROOT, 'Checkout to pack and copy to the workers (git-tracked and '
        'untracked, not ignored, files).')
_string('jax_version', tested_stack.NEWEST.jax, 'jax[tpu] version to install on the workers; default: the '
        'newest JAX the project tests (scripts/tested_stack.py).')
_string('python', None, 'Python version on the workers, e.g. 3.13 (installed with apt, from the deadsnakes '
        'PPA if Ubuntu lacks it); default: the tested Python for --jax_version.')
_string('config', None, 'Config spec path:arg relative to the code root, e.g. configs/nfnet.py:F0.')
flags.DEFINE_multi_string('override', [], 'A config override config.x=value (repeatable), passed verbatim.',
                          flag_values=FLAGS)
_string('workdir', None, 'gs:// directory for checkpoints and logs (resumed if it holds a run).')
_integer('lines', 50, 'Lines of each worker\'s log to show.')
_bool('follow', False, 'Keep printing the logs as they grow.')
_integer('poll_seconds', 120, 'Seconds between checks while `run` watches the job.')
_integer('max_recreations', 100, '`run` gives up after recreating the slice this many times.')
_integer('stuck_timeout', 3600, 'Seconds `watch` waits for a slice in one state other than READY (e.g. '
         'REPAIRING, STOPPED, UNKNOWN) before it stops with advice.')


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


def local_jax_version() -> Optional[str]:
  try:
    return importlib.metadata.version('jax')
  except importlib.metadata.PackageNotFoundError:
    return None


def _code(say: Callable[[str], None]) -> tpu_pod.Code:
  """What `setup` installs: by default the newest Python/JAX pair the project tests. A different JAX on
  this machine only earns a warning: the workers get the tested one."""
  python = (FLAGS.python or tested_stack.python_for(FLAGS.jax_version)).removeprefix('python')
  local_jax = local_jax_version()
  if local_jax and local_jax != FLAGS.jax_version:
    say(f'warning: this machine has jax {local_jax}; the workers get jax[tpu]=={FLAGS.jax_version} on Python '
        f'{python} (--jax_version, --python)')
  tarball = os.path.join(tempfile.gettempdir(), f'nfnets-code-{FLAGS.name}.tar.gz')
  return tpu_pod.Code(repo_url=FLAGS.repo_url, repo_ref=FLAGS.repo_ref, local_dir=FLAGS.local_dir,
                      local_tarball=tarball, jax_version=FLAGS.jax_version, python=python)


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
                     queued_resource=FLAGS.queued_resource or '', internal_ips=FLAGS.internal_ips,
                     service_account=FLAGS.service_account or '', scopes=FLAGS.scopes or '',
                     internal_ip=FLAGS.internal_ip, tunnel_through_iap=FLAGS.tunnel_through_iap)


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


def _say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def main(argv: list[str], *, runner: tpu_launcher.Runner = tpu_launcher.run_gcloud,
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> int:
  """Runs `launch_tpu_pod SUBCOMMAND --flags` (argv[0] is the program name); returns the exit status."""
  if any(arg in ('-h', '--help', '--helpfull') for arg in argv[1:]):
    print(__doc__)
    print(FLAGS.get_help())
    return 0
  try:
    subcommand = _parse(argv)
    pod = _pod()
    job = _job() if subcommand in ('train', 'run', 'watch') else None
    code = _code(_say) if subcommand in ('setup', 'run', 'watch') else None
    if subcommand in ('create', 'run', 'watch'):
      tpu_pod.create_command(pod)  # checks the accelerator type before anything runs
    if subcommand in ('run', 'watch') and pod.internal_ips and not (pod.internal_ip or pod.tunnel_through_iap):
      raise UsageError('with --internal_ips the workers have no external IP: add --tunnel_through_iap, or '
                       '--internal_ip when running from a machine in the same VPC')
  except (UsageError, ValueError) as e:
    _say(f'error: {e}')
    return 2
  if pod.preemptible:
    _say('note: a preemptible slice is stopped after at most 24 hours; --spot has no such limit')
  elif pod.spot and not pod.queued and subcommand in ('create', 'run'):
    _say('note: add --queued to wait in Google\'s queue for spot capacity instead of retrying the create')
  launcher = tpu_launcher.Launcher(pod, runner=runner, dry_run=FLAGS.dry_run, sleep=sleep, clock=clock,
                                   say=_say, create_timeout=FLAGS.create_timeout,
                                   stuck_timeout=FLAGS.stuck_timeout)
  try:
    if subcommand == 'create':
      launcher.create()
    elif subcommand == 'setup':
      launcher.setup(code)
    elif subcommand == 'train':
      launcher.train(job)
    elif subcommand == 'logs':
      launcher.logs(FLAGS.lines, FLAGS.follow)
    elif subcommand == 'status':
      launcher.status()
    elif subcommand == 'delete':
      launcher.delete()
    else:
      getattr(launcher, subcommand)(code, job, poll_seconds=FLAGS.poll_seconds,
                                    max_recreations=FLAGS.max_recreations)
  except (tpu_launcher.LaunchError, ValueError) as e:
    _say(f'error: {e}')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
