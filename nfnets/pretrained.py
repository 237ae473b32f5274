"""Safe loading of the published NFNet reference checkpoints (F0_haiku.npz ... F6_haiku.npz).

The files are Python pickles, written with dill 0.3.3 at protocol 3, of a Haiku 0.0.3 params
`FlatMapping` of `FlatMapping`s; dill writes numpy's C function `_reconstruct` as
`dill._dill._get_attr(dill._dill._import_module('numpy.core._multiarray_umath'), '_reconstruct')`.
Unpickling normally runs any callable the file names, so this loader uses an unpickler that can
only rebuild plain containers, numpy arrays, dtypes and scalars. Haiku and dill are never imported:
their globals resolve to local stand-ins that accept only that layout (a FlatMapping becomes a
plain dict). Any other global, module or attribute is refused before anything runs. The tree is
then recognised by the model family that published it (`nfnets.models`), and checked against the
architecture of the variant it describes.
"""
import importlib
import io
import pickle
from typing import Any, BinaryIO, Optional

import numpy as np
from etils import epath

from nfnets import models
from nfnets.errors import CheckpointError

Params = dict[str, dict[str, np.ndarray]]


def _numpy_module(name: str):
  """numpy 2 moved numpy.core to numpy._core; pickles from either era name one or the other."""
  try:
    return importlib.import_module(name.replace('numpy.core', 'numpy._core'))
  except ImportError:
    return importlib.import_module(name.replace('numpy._core', 'numpy.core'))


def _latin1_encode(text: str, encoding: str) -> bytes:
  """Stand-in for `_codecs.encode`, which protocol-2 pickles use to carry bytes as latin-1 text."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise CheckpointError('refused _codecs.encode call that is not a latin-1 bytes literal.')
  return text.encode('latin1')


# The only numpy functions a checkpoint may reach through dill's `_get_attr`, whatever era's name
# of numpy's C extension module it gives to `_import_module`.
_NUMPY_EXTENSION_FUNCTIONS = {
    '_reconstruct': _numpy_module('numpy._core.multiarray')._reconstruct,
    'scalar': _numpy_module('numpy._core.multiarray').scalar,
}
_NUMPY_EXTENSION_MODULES = tuple(f'{era}.{name}' for era in ('numpy.core', 'numpy._core')
                                 for name in ('_multiarray_umath', 'multiarray'))


def _short_repr(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + '...'


class _NumpyExtensionModule:
  """What a checkpoint's `_import_module` call yields: a name standing for numpy's C module.

  It is not the module itself, so the pickle can do nothing with it (no attribute access, no
  BUILD into its namespace) except pass it to the `_get_attr` stand-in.
  """
  __slots__ = ('name',)

  def __init__(self, name: str):
    self.name = name

  def __setstate__(self, state: Any):
    raise CheckpointError(f'refused to set state on dill module {self.name}.')


def _arg_types(args: tuple) -> str:
  return ', '.join(a.name if isinstance(a, _NumpyExtensionModule) else type(a).__name__
                   for a in args)


def _dill_import_module(*args) -> _NumpyExtensionModule:
  """Stand-in for dill's `_import_module(name)`: allows only numpy's C extension module."""
  if len(args) != 1 or not isinstance(args[0], str):
    raise CheckpointError(f'refused dill _import_module({_arg_types(args)}): it may only be '
                          'called with one module name.')
  if args[0] not in _NUMPY_EXTENSION_MODULES:
    allowed = ', '.join(_NUMPY_EXTENSION_MODULES)
    raise CheckpointError(f'refused dill _import_module({_short_repr(args[0])}): a checkpoint may '
                          f'import only numpy\'s extension module ({allowed}).')
  return _NumpyExtensionModule(args[0])


def _dill_get_attr(*args) -> Any:
  """Stand-in for dill's `_get_attr(module, name)`: only numpy's `_reconstruct` and `scalar`."""
  if len(args) != 2 or not isinstance(args[1], str):
    raise CheckpointError(f'refused dill _get_attr({_arg_types(args)}): it may only be called '
                          'with a module and an attribute name.')
  owner, name = args
  if not isinstance(owner, _NumpyExtensionModule):
    raise CheckpointError(f'refused dill _get_attr on a {type(owner).__name__} object '
                          f'(attribute {_short_repr(name)}): only numpy\'s extension module may be '
                          'looked into.')
  if name not in _NUMPY_EXTENSION_FUNCTIONS:
    raise CheckpointError(f'refused dill _get_attr({owner.name}, {_short_repr(name)}): only '
                          f'{" and ".join(_NUMPY_EXTENSION_FUNCTIONS)} may be taken from it.')
  return _NUMPY_EXTENSION_FUNCTIONS[name]


def _haiku_flat_mapping(*args) -> dict:
  """Stand-in for Haiku 0.0.3's `FlatMapping`, which pickles as `(FlatMapping, (dict,))`."""
  if len(args) != 1 or type(args[0]) is not dict:  # pylint: disable=unidiomatic-typecheck
    raise CheckpointError(f'refused haiku FlatMapping({_arg_types(args)}): only FlatMapping(dict) '
                          'is allowed.')
  return dict(args[0])


def _dill_create_array(build, args, state, npdict=None) -> np.ndarray:
  """Stand-in for dill's `_create_array`, which dill uses to pickle a top-level numpy array."""
  if build is not _NUMPY_EXTENSION_FUNCTIONS['_reconstruct']:
    raise CheckpointError('refused dill _create_array with a constructor other than '
                          'numpy _reconstruct.')
  if npdict:
    raise CheckpointError('refused dill _create_array carrying extra array attributes.')
  array = build(*args)
  array.__setstate__(state)
  return array


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('_codecs', 'encode'): _latin1_encode,
    ('haiku._src.data_structures', 'FlatMapping'): _haiku_flat_mapping,
}
for _era in ('numpy.core', 'numpy._core'):
  for _name, _function in _NUMPY_EXTENSION_FUNCTIONS.items():
    _SAFE_GLOBALS[(f'{_era}.multiarray', _name)] = _function
  _SAFE_GLOBALS[(f'{_era}.numeric', '_frombuffer')] = (
      _numpy_module('numpy._core.numeric')._frombuffer)
for _dill_module in ('dill._dill', 'dill.dill'):  # dill >= 0.3 and older releases.
  _SAFE_GLOBALS[(_dill_module, '_create_array')] = _dill_create_array
  _SAFE_GLOBALS[(_dill_module, '_get_attr')] = _dill_get_attr
  _SAFE_GLOBALS[(_dill_module, '_import_module')] = _dill_import_module


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals in `_SAFE_GLOBALS`; everything else is refused unexecuted."""

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise CheckpointError(
          f'refused to load global {module}.{name}: only numpy arrays, plain containers and '
          'the Haiku/dill helpers of the reference files are allowed in a checkpoint.') from None

  def persistent_load(self, pid: Any) -> Any:
    raise CheckpointError(f'refused persistent id {pid!r} in checkpoint.')


def safe_unpickle(data: bytes | BinaryIO) -> Any:
  """Unpickles bytes or a binary file allowing only containers, numpy arrays, dtypes and scalars.

  Haiku `FlatMapping`s come back as plain dicts.
  """
  stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
  try:
    return _RestrictedUnpickler(stream).load()
  except CheckpointError:
    raise
  except (EOFError, pickle.UnpicklingError) as e:
    raise CheckpointError(f'checkpoint is truncated or not a pickle ({e}).') from None
  except Exception as e:  # Malformed arguments to the allowed constructors.
    raise CheckpointError(f'checkpoint is corrupt: {type(e).__name__}: {e}') from None


def _as_params(tree: Any) -> Params:
  if not isinstance(tree, dict) or not all(isinstance(v, dict) for v in tree.values()):
    raise CheckpointError('checkpoint is not a Haiku params dict {module: {param: array}}.')
  params = {}
  for module, module_params in tree.items():
    params[module] = {}
    for name, value in module_params.items():
      if not isinstance(value, (np.ndarray, np.floating)) or not np.issubdtype(value.dtype,
                                                                            np.floating):
        raise CheckpointError(f'{module}/{name} is not a floating-point array '
                              f'(got {type(value).__name__} {getattr(value, "dtype", "")}).')
      params[module][name] = np.asarray(value).astype(np.float32, order='C', copy=False)
  return params


def recognise(params: Params) -> dict[str, Any]:
  """The model config (family defaults for the inferred variant and class count) a reference tree describes.

  Every registered family that publishes reference checkpoints is asked in turn; the first that recognises
  the tree wins, and the tree must then have exactly that model's modules and shapes.
  """
  errors = []
  for name in models.family_names():
    family = models.get_family(name)
    if family.config_from_reference is None:
      continue
    try:
      entries = family.config_from_reference(params)
    except CheckpointError as e:
      errors.append(str(e))
      continue
    model_config = models.model_config(name, **entries)
    check_params(params, model_config)
    return model_config.to_dict()
  raise CheckpointError(errors[0] if len(errors) == 1 else f'no model family recognises the tree: {"; ".join(errors)}')


def check_params(params: Params, model_config) -> None:
  """Raises CheckpointError unless `params` has exactly the modules and shapes of the configured model."""
  expected, _ = models.abstract_params(model_config)
  label = f'{model_config["name"]}-{model_config["variant"]}'
  missing = sorted(set(expected) - set(params))
  extra = sorted(set(params) - set(expected))
  if missing:
    raise CheckpointError(f'checkpoint is missing module {missing[0]!r} of {label} ({len(missing)} missing in all)')
  if extra:
    raise CheckpointError(f'checkpoint has module {extra[0]!r} that {label} lacks ({len(extra)} extra in all)')
  for module, shapes in expected.items():
    if set(params[module]) != set(shapes):
      raise CheckpointError(f'{module} has params {sorted(params[module])}, expected {sorted(shapes)}')
    for name, leaf in shapes.items():
      if params[module][name].shape != leaf.shape:
        raise CheckpointError(f'{module}/{name} has shape {params[module][name].shape}, expected '
                              f'{leaf.shape} for {label}')


def load_reference(path: str | epath.PathLike, variant: Optional[str] = None) -> tuple[Params, dict[str, Any]]:
  """Loads a reference checkpoint safely; returns (params, model config dict).

  The params (float32 numpy arrays) feed straight into `models.make_forward(model_config).apply`. If
  `variant` is given the file must hold it. Every error names the file.
  """
  path = epath.Path(path)
  if not path.is_file():
    raise CheckpointError(f'checkpoint {path} does not exist; download the F*_haiku.npz file first')
  try:
    with path.open('rb') as f:  # Streamed: F6 is ~1.8 GB.
      params = _as_params(safe_unpickle(f))
    model_config = recognise(params)
    if variant is not None and variant != model_config['variant']:
      raise CheckpointError(f'checkpoint holds {model_config["variant"]}, not the requested {variant}')
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
  return params, model_config
