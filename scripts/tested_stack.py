"""The Python/JAX pairs the project is tested on: the one place that names them.

CI tests both ends (the oldest and the newest pair); the TPU pod launcher installs the newest pair on every
worker by default. Anything that needs these versions reads them from here, in Python
(`from scripts import tested_stack`) or from a shell:

  python3 -m scripts.tested_stack newest     # prints "3.13 0.12.1": the Python and JAX versions
  python3 -m scripts.tested_stack oldest     # prints "3.11 0.10.2"
"""
import dataclasses
import sys


@dataclasses.dataclass(frozen=True)
class Stack:
  python: str   # major.minor, e.g. '3.13'
  jax: str      # an exact release, e.g. '0.12.1'


OLDEST = Stack(python='3.11', jax='0.10.2')
NEWEST = Stack(python='3.13', jax='0.12.1')

# The oldest Python each JAX minor release installs on (its wheels' Requires-Python); a minor not listed
# needs at least the oldest pair's Python.
_MIN_PYTHON_BY_JAX_MINOR = {'0.12': '3.12'}


def _version_tuple(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split('.'))


def min_python(jax_version: str) -> str:
  """The oldest Python that `jax_version` installs on, e.g. '3.12' for '0.12.1'."""
  minor = '.'.join(jax_version.split('.')[:2])
  return _MIN_PYTHON_BY_JAX_MINOR.get(minor, OLDEST.python)


def python_for(jax_version: str) -> str:
  """The Python to pair with `jax_version`: the tested pair's Python if it is a tested release, else the
  newest pair's Python (the newest supported Python runs every supported JAX)."""
  for stack in (NEWEST, OLDEST):
    if stack.jax == jax_version:
      return stack.python
  return NEWEST.python


def check_pair(python: str, jax_version: str) -> None:
  """Raises ValueError when `python` is too old for `jax_version`."""
  try:
    too_old = _version_tuple(python) < _version_tuple(min_python(jax_version))
  except ValueError as e:
    raise ValueError(f'Python version {python!r} is not of the form 3.13') from e
  if too_old:
    raise ValueError(f'jax {jax_version} needs Python >= {min_python(jax_version)}, not {python}')


def main(argv: list[str]) -> int:
  stacks = {'newest': NEWEST, 'oldest': OLDEST}
  if len(argv) != 2 or argv[1] not in stacks:
    print('usage: python3 -m scripts.tested_stack newest|oldest', file=sys.stderr)
    return 2
  stack = stacks[argv[1]]
  print(stack.python, stack.jax)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
