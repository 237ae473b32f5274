"""The command-line layer every entry point shares (experiments/ and scripts/).

  * `--config path:arg` plus `--config.x=value` overrides, through ml_collections `config_flags` and absl;
    a bad flag, config file or override ends with one line and exit status 2;
  * `run(main)`: runs an absl main so that a `UserError` becomes one line (`error: ...`) and exit status 1,
    while every other exception keeps its traceback;
  * the multi-host flags and `jax.distributed` start-up;
  * `--out`, where a command writes its results.

Which config a checkpoint is used with is the configs' rule (`configs.for_checkpoint`); commands whose default
config is the checkpoint's own call `require_config_for_overrides` first.
"""
import functools
import os
import sys
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

import configs
from nfnets import distributed
from nfnets.errors import ConfigError
from nfnets.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding configs/
DEFAULT_CONFIG = os.path.join(REPO_ROOT, 'configs', 'nfnet.py') + ':tiny'
_GIVEN = {'config': False, 'overrides': False, 'default': DEFAULT_CONFIG}


def define_config_flag(help_text: str = 'Experiment config, as path:arg.',
                       default: str = DEFAULT_CONFIG) -> flags.FlagHolder:
  """`--config path:arg` (default `configs/nfnet.py:tiny`); `--config.x=value` overrides any field.

  Idempotent, so that several commands' modules can be imported into one process (as the tests do).
  """
  _GIVEN['default'] = default
  if 'config' in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS['config'])
  return config_flags.DEFINE_config_file('config', None, f'{help_text} Default: {default}', lock_config=True)


def define_out_flag(help_text: str) -> flags.FlagHolder:
  """`--out` (no default): where the command writes its results; `help_text` says what it writes there.

  Idempotent, as `define_config_flag` is: several commands write to an --out of their own, and their modules can
  be imported into one process (as the tests do); a process runs one command, whose help is the one shown.
  """
  if 'out' in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS['out'])
  return flags.DEFINE_string('out', None, help_text)


def define_distributed_flags() -> None:
  """Flags that set up a multi-process run: peers where JAX cannot discover them, and each process's GPUs."""
  if 'coordinator_address' in flags.FLAGS:
    return
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for jax.distributed.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
  flags.DEFINE_integer('process_id', None, 'This process\'s index in [0, num_processes).')
  flags.DEFINE_string('local_device_ids', distributed.AUTO,
                      f'GPUs this process drives: {distributed.AUTO!r} (JAX\'s choice: under SLURM or Open MPI '
                      f'the one GPU at the local rank, for one process per GPU), {distributed.ALL!r} (every GPU '
                      'the process sees: one process per node, or one GPU bound to each task by the launcher), '
                      'or ids such as 0,1,2,3.')
  flags.DEFINE_string('cluster_detection_method', None,
                      'How JAX finds its peers, passed to jax.distributed.initialize: e.g. slurm, ompi, mpi4py, '
                      'or deactivate; default: the first environment JAX recognises.')


def config_given() -> bool:
  """Whether the command line named a --config (rather than running on the default)."""
  return _GIVEN['config']


def config_spec(flag_name: str = 'config') -> str:
  """The config as given on the command line (or the default), `path[:arg]`, without its overrides."""
  return config_flags.get_config_filename(flags.FLAGS[flag_name])


def config_name(flag_name: str = 'config') -> str:
  """'tiny' for --config configs/nfnet.py:tiny; the file's stem when the config takes no argument."""
  path, _, arg = config_spec(flag_name).partition(':')
  return (arg or os.path.splitext(os.path.basename(path))[0]).replace('+', 'plus')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag, config file or override ends with one line and exit status 2."""
  _GIVEN['config'] = any(arg == '--config' or arg.startswith('--config=') for arg in argv[1:])
  _GIVEN['overrides'] = any(arg.startswith('--config.') for arg in argv[1:])
  if 'config' in flags.FLAGS and not _GIVEN['config']:
    # The flag has no default of its own: ml_collections would load a default, and apply the command
    # line's overrides to it, while the flag is being defined, outside any error handling.
    argv = [argv[0], f'--config={_GIVEN["default"]}', *argv[1:]]
  for arg in argv[1:]:
    # An old field name in an override would otherwise read "no config field": say what it became.
    flag, _, field = arg[2:].partition('=')[0].partition('.')
    if arg.startswith('--') and field in configs.RENAMED_FIELDS and flag in flags.FLAGS:
      print(f'error: bad command line: --{flag}.{field} was renamed: use {configs.RENAMED_FIELDS[field]}',
            file=sys.stderr, flush=True)
      sys.exit(2)
  try:
    remaining = flags.FLAGS(argv)
    # ml_collections applies --config.x overrides when the config is first read: read it here.
    if 'config' in flags.FLAGS:
      # A config file that failed to load is only reported when the config is first used: use it here.
      flags.FLAGS['config'].value.keys()
    return remaining
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    text = str(e)
    if len(text) > 1 and text[0] == text[-1] == "'":  # ml_collections wraps a repr in its message
      text = text[1:-1].replace("\\'", "'").replace('\\n', '\n')
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(('Traceback', 'File ', 'Pass --help'))]
    # A failing config file reports its own exception last; an override error says all in its lines.
    message = lines[-1] if isinstance(e, flags.Error) and len(lines) > 1 else ' '.join(lines)
    if isinstance(e, (AttributeError, KeyError)):
      message = f'no config field {message}'
    print(f'error: bad command line: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def report_error(error: BaseException) -> None:
  """Prints an error as the single line `error: <message>` on stderr."""
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  print(f'error: {message}', file=sys.stderr, flush=True)


_DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids',
                      'cluster_detection_method')


def initialize_distributed(config: Optional[ml_collections.ConfigDict] = None) -> None:
  """Joins a multi-process run when the config or the distributed flags ask for one; prints the device layout.

  Every process prints its own line (processes, local and global devices), so that a run that drives fewer
  devices than meant shows in the first lines of its log; processes with unequal device counts are refused.
  """
  values = {name: flags.FLAGS[name].value for name in _DISTRIBUTED_FLAGS if name in flags.FLAGS}
  # The GPUs of a process are a detail of a multi-process run: alone they do not ask for one.
  enabled = bool(config is not None and config.get('distributed')) or any(
      values[name] != flags.FLAGS[name].default for name in values if name != 'local_device_ids')
  distributed.initialize(enabled, **values)
  print(distributed.layout_line(), flush=True)
  distributed.check_layout()


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with the project's flag parser and one-line user errors (exit status 1)."""

  @functools.wraps(main)
  def guarded(argv):
    logging.set_verbosity(logging.ERROR)  # orbax and grain are chatty below that
    try:
      main(argv)
    except UserError as e:
      report_error(e)
      sys.exit(1)

  app.run(guarded, flags_parser=parse_flags)


def require_config_for_overrides() -> None:
  """For commands whose default config is the checkpoint's own: overrides must say what they override."""
  if _GIVEN['overrides'] and not _GIVEN['config']:
    raise ConfigError('--config.* overrides need --config (the config they override)')
