"""What the entry points share: the repository root, the config's short name, one-line errors."""
import contextlib
import os
import sys

from absl import flags
from ml_collections import config_flags

from nfnets import checkpoint
from nfnets import pretrained
from nfnets import trainer
from nfnets.data import sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, 'configs', 'nfnet.py') + ':tiny'

# Errors that mean "the input is wrong", reported as one line rather than a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, checkpoint.CheckpointError, pretrained.CheckpointError,
               sources.DataNotFoundError, trainer.TrainingError)


def config_name(flag_name: str = 'config') -> str:
  """'tiny' for --config configs/nfnet.py:tiny; the file's stem when the config takes no argument."""
  spec = config_flags.get_config_filename(flags.FLAGS[flag_name])
  path, _, arg = spec.partition(':')
  return (arg or os.path.splitext(os.path.basename(path))[0]).replace('+', 'plus')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag, config file or override ends with one line and exit status 2.

  Passed to `app.run(main, flags_parser=parse_flags)`; absl would otherwise print a traceback from inside
  the config file or ml_collections.
  """
  if not any(arg == '--config' or arg.startswith('--config=') for arg in argv[1:]):
    # The flag has no default of its own: ml_collections would load a default, and apply the command
    # line's overrides to it, while the flag is being defined, outside any error handling.
    argv = [argv[0], f'--config={DEFAULT_CONFIG}', *argv[1:]]
  try:
    remaining = flags.FLAGS(argv)
    # ml_collections applies --config.x overrides when the config is first read: read it here.
    for name in ('config',):
      if name in flags.FLAGS:
        flags.FLAGS[name].value  # pylint: disable=pointless-statement
    return remaining
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
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


def report_error(error: Exception) -> None:
  """Prints a user error as the single line `error: <message>` on stderr."""
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  print(f'error: {message}', file=sys.stderr, flush=True)


@contextlib.contextmanager
def one_line_errors():
  """Turns a user error into one `error:` line and exit status 1; other errors keep tracebacks."""
  try:
    yield
  except USER_ERRORS as e:
    report_error(e)
    sys.exit(1)
