"""Names of parameters by path, for the rules that treat parameters differently (weight decay, AGC's exclusions,
freezing all but the classifier).

In a Haiku params dict {module_name: {param_name: array}} a leaf's path is (module_name, param_name).
"""
from typing import Any, Callable

import jax

ParamPath = tuple[str, str]

_MODULE_SEPARATOR = '/~/'


def is_final_classifier_weight(path: ParamPath) -> bool:
  """True only for the weight of the network's top-level linear, i.e. '<Net>/~/linear' param 'w'.

  By the project's convention the final classifier is the top-level hk.Linear named 'linear', so its module
  name holds exactly one '/~/'. Its bias and nested linears (squeeze-excite: '<Net>/~/block/~/.../linear')
  are not matched (AGC clips them; weight decay and freezing treat them as any other leaf).
  """
  module_name, param_name = path
  parts = module_name.split(_MODULE_SEPARATOR)
  return len(parts) == 2 and parts[1] == 'linear' and param_name == 'w'


def _key_name(entry: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def param_path(key_path: tuple[Any, ...]) -> ParamPath:
  """(module_name, param_name) of a leaf from its JAX key path.

  For a Haiku params dict this is exactly (module, param). Deeper trees join all but the last key with '/'.
  """
  names = [_key_name(entry) for entry in key_path]
  if not names:
    return ('', '')
  return ('/'.join(names[:-1]), names[-1])


def path_mask(params: Any, predicate: Callable[[ParamPath, jax.Array], bool]) -> Any:
  """A tree of Python bools shaped like `params`: predicate(path, leaf) for every leaf."""
  return jax.tree_util.tree_map_with_path(lambda kp, leaf: bool(predicate(param_path(kp), leaf)), params)
