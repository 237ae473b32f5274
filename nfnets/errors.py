"""The project's error types: bad input from the user, as opposed to bugs.

A `UserError` is raised on purpose when the input is wrong (an unknown variant, a bad config value, missing data,
a corrupt or mismatched checkpoint, a diverged run). The command-line layer (`nfnets.cli`) prints it as one line,
`error: <message>`, and exits with status 1. Every other exception, a shape bug inside a model included, keeps its
traceback. Errors about a file name the file.
"""


class UserError(Exception):
  """Bad input from the user; reported as one line, without a traceback."""


class ConfigError(UserError, ValueError):
  """A config value (or a command-line flag) that cannot work."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that is missing, unreadable, unsafe, or does not fit the model asked for."""


class DataNotFoundError(UserError, FileNotFoundError):
  """A dataset that has not been prepared where the config says it is."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. a run of non-finite losses); the last good checkpoint is kept."""
