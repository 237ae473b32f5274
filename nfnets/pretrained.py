"""Safe loading of the published NFNet reference checkpoints (F0_haiku.npz ... F6_haiku.npz).

The files are Python pickles, written with dill 0.3.3 at protocol 3, of a Haiku 0.0.3 params
`FlatMapping` of `FlatMapping`s; dill writes numpy's C function `_reconstruct` as
`dill._dill._get_attr(dill._dill._import_module('numpy.core._multiarray_umath'), '_reconstruct')`.
Unpickling normally runs any callable the file names, so this loader uses an unpickler that can
only rebuild plain containers, numpy arrays, dtypes and scalars. Haiku and dill are never imported:
their globals resolve to local stand-ins that accept only that layout (a FlatMapping becomes a
plain dict). Any other global, module or attribute is refused before anything runs. The tree is
then checked against the architecture of the variant it describes.
"""
import copy
import functools
import importlib
import io
import math
import os
import pickle
import re
from typing import Any, BinaryIO

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import nfnet

Params = dict[str, dict[str, np.ndarray]]

_ROOT = 'NFNet'
CLASSIFIER_MODULE = f'{_ROOT}/~/linear'
_BLOCK_RE = re.compile(rf'^{_ROOT}/~/nf_block(?:_(\d+))?(?:/~/.*)?$')
_KNOWN_MODULE_RE = re.compile(
    rf'^{_ROOT}/~/(?:stem_conv[0-3]|final_conv|linear|nf_block(?:_\d+)?'
    r'(?:/~/(?:conv0|conv1|conv1b|conv2|conv_shortcut|squeeze_excite/~/linear(?:_1)?))?)$')


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, unsafe, or does not match the NFNet architecture."""


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


def _check_module_names(params: Params) -> None:
  unknown = sorted(m for m in params if not _KNOWN_MODULE_RE.match(m))
  if unknown:
    raise CheckpointError(f'unknown module {unknown[0]!r} in checkpoint '
                          f'({len(unknown)} unknown in all); expected NFNet reference names.')


def _block_index(module: str) -> int | None:
  match = _BLOCK_RE.match(module)
  if match is None:
    return None
  return int(match.group(1) or 0)


def num_classes_of(params: Params) -> int:
  """Number of classes of the classifier in an NFNet params dict."""
  try:
    return int(params[CLASSIFIER_MODULE]['w'].shape[-1])
  except KeyError:
    raise CheckpointError(f'checkpoint has no classifier {CLASSIFIER_MODULE}/w.') from None


def infer_variant(params: Params) -> str:
  """Name of the NFNet variant ('F0'..'F7', 'F0+'..'F7+') whose architecture `params` describe."""
  _check_module_names(params)
  indices = {_block_index(m) for m in params} - {None}
  if not indices or indices != set(range(max(indices) + 1)):
    raise CheckpointError(f'checkpoint blocks are not numbered 0..n-1 (found {sorted(indices)}).')
  block_name = lambda i: f'{_ROOT}/~/nf_block' + (f'_{i}' if i else '')
  stage_starts = [i for i in sorted(indices) if f'{block_name(i)}/~/conv_shortcut' in params]
  if not stage_starts or stage_starts[0] != 0:
    raise CheckpointError('checkpoint block 0 has no conv_shortcut; not an NFNet tree.')
  depths = tuple(np.diff(stage_starts + [len(indices)]).tolist())
  try:
    widths = tuple(int(params[f'{block_name(i)}/~/conv2']['w'].shape[-1]) for i in stage_starts)
  except KeyError as e:
    raise CheckpointError(f'checkpoint is missing a block conv2 weight: {e}.') from None
  for name, config in nfnet.VARIANTS.items():
    if config['depths'] == depths and config.get('widths', nfnet.WIDTHS) == widths:
      return name
  raise CheckpointError(f'no NFNet variant has depths {depths} and widths {widths}.')


def expected_shapes(variant: str, num_classes: int = 1000) -> dict[str, dict[str, tuple]]:
  """Parameter shapes of NFNet `variant`, from abstract initialisation (nothing is allocated)."""
  return copy.deepcopy(_expected_shapes(variant, num_classes))


@functools.lru_cache(maxsize=None)
def _expected_shapes(variant: str, num_classes: int) -> dict[str, dict[str, tuple]]:
  model = hk.transform(lambda x: nfnet.NFNet(num_classes, variant)(x, is_training=False))
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
  return {m: {n: tuple(a.shape) for n, a in p.items()} for m, p in abstract.items()}


def check_params(params: Params, variant: str) -> None:
  """Raises CheckpointError unless `params` has exactly the modules and shapes of `variant`."""
  _check_module_names(params)
  expected = expected_shapes(variant, num_classes_of(params))
  missing = sorted(set(expected) - set(params))
  extra = sorted(set(params) - set(expected))
  if missing:
    raise CheckpointError(f'checkpoint is missing module {missing[0]!r} of NFNet-{variant} '
                          f'({len(missing)} missing in all).')
  if extra:
    raise CheckpointError(f'checkpoint has module {extra[0]!r} that NFNet-{variant} lacks '
                          f'({len(extra)} extra in all).')
  for module, shapes in expected.items():
    if set(params[module]) != set(shapes):
      raise CheckpointError(f'{module} has params {sorted(params[module])}, expected '
                            f'{sorted(shapes)}.')
    for name, shape in shapes.items():
      if params[module][name].shape != shape:
        raise CheckpointError(f'{module}/{name} has shape {params[module][name].shape}, '
                              f'expected {shape} for NFNet-{variant}.')


def load_official_params(path: str | os.PathLike, variant: str | None = None
                         ) -> tuple[Params, str]:
  """Loads a reference checkpoint safely; returns (params, variant name).

  The params (float32 numpy arrays) feed straight into
  ``hk.transform(lambda x: NFNet(num_classes, variant)(x, is_training=False)).apply``, with
  ``num_classes = num_classes_of(params)``. If `variant` is given the file must match it.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint {os.fspath(path)!r} does not exist; download the '
                            'F*_haiku.npz file first.')
  try:
    with open(path, 'rb') as f:  # Streamed: F6 is ~1.8 GB.
      params = _as_params(safe_unpickle(f))
    found = infer_variant(params)
    if variant is not None and variant != found:
      raise CheckpointError(f'checkpoint holds NFNet-{found}, not the requested NFNet-{variant}.')
    check_params(params, found)
  except CheckpointError as e:
    raise CheckpointError(f'{os.fspath(path)}: {e}') from None
  return params, found


def param_count(params: Params) -> int:
  """Total number of scalars in a params dict."""
  return sum(math.prod(a.shape) for p in params.values() for a in p.values())
