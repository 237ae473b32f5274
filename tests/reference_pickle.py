"""Writes pickles in the byte layout of the published F*_haiku.npz files, without Haiku or dill.

The files are dill 0.3.3 pickles (protocol 3) of a Haiku 0.0.3 `FlatMapping` of `FlatMapping`s
(see /work/shared/spec/nfnets-reference.md, "Public reference checkpoints"). Neither library's
code is used here: `stand_in_modules()` registers small modules under their names
(`haiku._src.data_structures`, `dill._dill`) only while it is active, so that pickle can write
globals by those names, and `Dill033Pickler` writes numpy's C functions the way dill 0.3.3 does:
`_get_attr(_import_module('numpy.core._multiarray_umath'), '_reconstruct')`.

The stand-ins behave like the originals, so an ordinary (unsafe) unpickler can read what is
written, and they record every call in `StandIns.calls`, so a test can tell whether a loader ran
any of them.
"""
import collections.abc
import contextlib
import dataclasses
import importlib
import io
import pickle
import sys
import types
from typing import Any, Callable, Iterator

import numpy as np

# numpy's C extension module: `_reconstruct` (arrays) and `scalar` (numpy scalars) live there.
_NUMPY_C_MODULE = np.ndarray.__reduce__(np.zeros(0))[0].__self__
# What dill 0.3.3 wrote for that module under numpy 1.x, the era of the published files.
REFERENCE_NUMPY_MODULE = 'numpy.core._multiarray_umath'


@dataclasses.dataclass
class StandIns:
  flat_mapping: type
  get_attr: Callable[[Any, str], Any]
  import_module: Callable[[str], Any]
  calls: list


def _stand_in_modules(calls: list) -> tuple[StandIns, dict[str, types.ModuleType]]:
  data_structures = types.ModuleType('haiku._src.data_structures')
  dill_package = types.ModuleType('dill')
  dill_module = types.ModuleType('dill._dill')

  class FlatMapping(collections.abc.Mapping):
    """Haiku 0.0.3's immutable params mapping, as far as pickling goes."""

    def __init__(self, mapping):
      calls.append(('FlatMapping', type(mapping).__name__))
      self._mapping = dict(mapping)

    def __getitem__(self, key):
      return self._mapping[key]

    def __iter__(self):
      return iter(self._mapping)

    def __len__(self):
      return len(self._mapping)

    def __reduce__(self):
      return FlatMapping, (dict(self._mapping),)

  def _import_module(import_name):
    calls.append(('_import_module', import_name))
    return importlib.import_module(import_name)

  def _get_attr(obj, name):
    calls.append(('_get_attr', name))
    return getattr(obj, name)

  for module, value in ((data_structures, FlatMapping), (dill_module, _import_module),
                        (dill_module, _get_attr)):
    value.__module__ = module.__name__
    value.__qualname__ = value.__name__
    setattr(module, value.__name__, value)
  dill_package._dill = dill_module  # pylint: disable=protected-access
  modules = {'haiku._src.data_structures': data_structures, 'dill': dill_package,
             'dill._dill': dill_module}
  return StandIns(FlatMapping, _get_attr, _import_module, calls), modules


@contextlib.contextmanager
def stand_in_modules() -> Iterator[StandIns]:
  """Registers the Haiku/dill stand-ins in sys.modules while active (shadowing any real ones)."""
  stand_ins, modules = _stand_in_modules([])
  saved = {name: sys.modules.get(name) for name in modules}
  sys.modules.update(modules)
  try:
    yield stand_ins
  finally:
    for name, module in saved.items():
      if module is None:
        del sys.modules[name]
      else:
        sys.modules[name] = module


# dill 0.3.3 subclasses the pure-Python pickler as well; it also streams large bytes to the file
# instead of buffering the whole pickle.
class Dill033Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Protocol-3 pickler writing numpy's C functions as dill 0.3.3 does (needs `stand_in_modules`).

  `numpy_module` is the name written for numpy's C extension module (numpy 1.x's by default).
  """

  def __init__(self, file, stand_ins: StandIns, numpy_module: str = REFERENCE_NUMPY_MODULE):
    super().__init__(file, protocol=3)
    self._stand_ins = stand_ins
    self._numpy_module = numpy_module

  def reducer_override(self, obj):
    if obj is _NUMPY_C_MODULE:
      return self._stand_ins.import_module, (self._numpy_module,)
    if isinstance(obj, types.BuiltinFunctionType) and obj.__self__ is _NUMPY_C_MODULE:
      return self._stand_ins.get_attr, (obj.__self__, obj.__name__)
    return NotImplemented


def as_flat_mappings(stand_ins: StandIns, tree: dict) -> Any:
  """{module: {name: array}} as a FlatMapping of FlatMappings, as Haiku 0.0.3's `init` returned."""
  return stand_ins.flat_mapping({m: stand_ins.flat_mapping(p) for m, p in tree.items()})


def dump(stand_ins: StandIns, tree: dict, file, numpy_module: str = REFERENCE_NUMPY_MODULE):
  """Writes `tree` to `file` in the reference layout (building it is not recorded in `calls`)."""
  recorded = len(stand_ins.calls)
  flat_mappings = as_flat_mappings(stand_ins, tree)
  del stand_ins.calls[recorded:]
  Dill033Pickler(file, stand_ins, numpy_module).dump(flat_mappings)


def dumps(stand_ins: StandIns, obj: Any) -> bytes:
  """`obj` pickled as dill 0.3.3 would, as is (no FlatMappings added)."""
  buffer = io.BytesIO()
  Dill033Pickler(buffer, stand_ins).dump(obj)
  return buffer.getvalue()


class ByteCounter:
  """A write-only file that keeps only the number of bytes written."""

  def __init__(self):
    self.size = 0

  def write(self, data) -> int:
    self.size += len(data)
    return len(data)


class Call:
  """Pickles as the call `fn(*args)` (then BUILD with `state` if given): how a hostile file
  embeds code. Callable only so that pickle accepts it as the function of another `Call`."""

  def __init__(self, fn, *args, state=None):
    self.fn, self.args, self.state = fn, args, state

  def __reduce__(self):
    return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)

  def __call__(self, *args):
    raise AssertionError('only ever pickled')
