"""Tests for nfnets.pretrained: the restricted unpickler and the checkpoint tree checks."""
import builtins
import io
import os
import pickle
import pickletools
import re
import sys
import types
import warnings

import haiku as hk
import jax
import numpy as np
import pytest

from nfnets.models import nfnet
from nfnets import pretrained
from tests import helpers
from tests import reference_forward
from tests import reference_pickle

SMALL_TREE = {'NFNet/~/linear': {'w': np.arange(6, dtype=np.float32).reshape(2, 3),
                                 'b': np.float32([0.5, -1.0, 2.0])},
              'other': {'scale': np.float32(3.0), 'values': np.ones((2, 2), np.float64)}}


def _assert_same_tree(got, expected):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
    assert np.asarray(a).dtype == np.asarray(b).dtype


def _globals_in(data: bytes) -> set[str]:
  """Names of the globals a pickle references (GLOBAL text or the strings before STACK_GLOBAL)."""
  names, strings = set(), []
  for op, arg, _ in pickletools.genops(data):
    if op.name == 'GLOBAL':
      names.add(arg.replace(' ', '.'))
    elif op.name == 'STACK_GLOBAL':
      names.add('.'.join(strings[-2:]))
    elif isinstance(arg, str):
      strings.append(arg)
  return names


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_plain_pickles_round_trip(protocol):
  data = pickle.dumps(SMALL_TREE, protocol=protocol)
  _assert_same_tree(pretrained.safe_unpickle(data), SMALL_TREE)


@pytest.mark.parametrize('protocol', [2, 3])
def test_numpy_1x_module_names_are_accepted(protocol):
  data = pickle.dumps(SMALL_TREE, protocol=protocol)
  old = data.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')
  assert 'numpy.core.multiarray._reconstruct' in _globals_in(old)
  _assert_same_tree(pretrained.safe_unpickle(old), SMALL_TREE)


@pytest.fixture
def fake_dill(monkeypatch):
  """Stands in for dill so we can write pickles the way dill writes arrays (via _create_array)."""
  module = types.ModuleType('dill._dill')

  def _create_array(f, args, state, npdict=None):
    raise AssertionError('the loader must never call the real dill function')

  _create_array.__module__ = 'dill._dill'
  _create_array.__qualname__ = '_create_array'
  module._create_array = _create_array
  monkeypatch.setitem(sys.modules, 'dill', types.ModuleType('dill'))
  monkeypatch.setitem(sys.modules, 'dill._dill', module)

  class DillLikePickler(pickle.Pickler):

    def reducer_override(self, obj):
      if type(obj) is np.ndarray:
        f, args, state = obj.__reduce__()
        return _create_array, (f, args, state, None)
      return NotImplemented

  return DillLikePickler


@pytest.mark.parametrize('protocol', [2, 4])
def test_dill_written_arrays_are_rebuilt_safely(fake_dill, protocol, tmp_path):
  path = tmp_path / 'tree.pkl'
  with open(path, 'wb') as f:
    fake_dill(f, protocol=protocol).dump(SMALL_TREE)
  data = path.read_bytes()
  assert 'dill._dill._create_array' in _globals_in(data)
  _assert_same_tree(pretrained.safe_unpickle(data), SMALL_TREE)


def test_dill_create_array_refuses_other_constructors(fake_dill):
  del fake_dill  # Only needed so that the dill stand-in can be pickled by reference.
  # An allowed global (numpy.dtype) smuggled in as the array builder.
  create = sys.modules['dill._dill']._create_array
  smuggled = reference_pickle.Call(create, np.dtype, ('f4',), None, None)
  bad = pickle.dumps({'m': {'w': smuggled}}, protocol=2)
  with pytest.raises(pretrained.CheckpointError, match='constructor other than numpy'):
    pretrained.safe_unpickle(bad)


# What the published files hold: arrays (skip_gain is 0-d); a numpy scalar exercises `scalar` too.
REFERENCE_TREE = {'NFNet/~/linear': {'w': np.arange(6, dtype=np.float32).reshape(2, 3),
                                     'b': np.float32([0.5, -1.0, 2.0])},
                  'NFNet/~/nf_block': {'skip_gain': np.array(0.25, np.float32)},
                  'other': {'values': np.ones((2, 2), np.float64), 'scale': np.float32(3.0)}}
# The globals of a reference file, in the order they are written (each once, then memoized).
REFERENCE_GLOBALS = ['haiku._src.data_structures.FlatMapping', 'dill._dill._get_attr',
                     'dill._dill._import_module', 'numpy.ndarray', 'numpy.dtype']


def _global_ops(data: bytes) -> list[str]:
  return [arg.replace(' ', '.') if op.name == 'GLOBAL' else op.name
          for op, arg, _ in pickletools.genops(data) if op.name in ('GLOBAL', 'STACK_GLOBAL')]


@pytest.mark.parametrize('numpy_module', [reference_pickle.REFERENCE_NUMPY_MODULE,
                                          'numpy._core._multiarray_umath', 'numpy.core.multiarray'])
def test_reference_layout_is_read_without_running_haiku_or_dill(numpy_module):
  with reference_pickle.stand_in_modules() as stand_ins:
    buffer = io.BytesIO()
    reference_pickle.dump(stand_ins, REFERENCE_TREE, buffer, numpy_module)
    data = buffer.getvalue()
    got = pretrained.safe_unpickle(data)
    assert not stand_ins.calls  # The stand-ins were importable, yet nothing of them ran.
    # The layout is what Haiku/dill would read: an ordinary unpickler rebuilds it through them.
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', DeprecationWarning)  # numpy 2 warns on numpy.core names.
      unsafe = pickle.loads(data)
    assert isinstance(unsafe['NFNet/~/linear'], stand_ins.flat_mapping)
    assert ('_import_module', numpy_module) in stand_ins.calls
  assert type(got) is dict and all(type(p) is dict for p in got.values())
  _assert_same_tree(got, REFERENCE_TREE)

  ops = list(pickletools.genops(data))
  assert (ops[0][0].name, ops[0][1]) == ('PROTO', 3)
  assert _global_ops(data) == REFERENCE_GLOBALS
  strings = [arg for _, arg, _ in ops if isinstance(arg, str)]
  after_import = strings.index('dill._dill _import_module') + 1
  assert strings[after_import:after_import + 2] == [numpy_module, '_reconstruct']
  assert 'scalar' in strings


def test_hostile_calls_through_the_reference_helpers_are_refused_without_running(tmp_path):
  marker = tmp_path / 'pwned'
  call = reference_pickle.Call
  with reference_pickle.stand_in_modules() as stand_ins:
    imp, get = stand_ins.import_module, stand_ins.get_attr
    reconstruct = call(get, call(imp, reference_pickle.REFERENCE_NUMPY_MODULE), '_reconstruct')
    numpy_python_module = call(imp, 'numpy._core.multiarray')  # An allowed name, with __builtins__.
    live_attacks = {
        r"_import_module\('os'\)": call(call(get, call(imp, 'os'), 'system'), f'touch {marker}'),
        r"_get_attr\(numpy._core.multiarray, '__builtins__'\)": call(
            call(call(get, call(get, numpy_python_module, '__builtins__'), 'get'), 'eval'),
            f'open({str(marker)!r}, "w").close()'),
    }
    refused = {
        r"_get_attr on a builtin_function_or_method object \(attribute '__self__'\)": call(
            get, reconstruct, '__self__'),
        r"_get_attr on a type object \(attribute '__subclasses__'\)": call(
            get, np.ndarray, '__subclasses__'),
        r"_get_attr\(numpy.core._multiarray_umath, str, NoneType\)": call(
            get, call(imp, 'numpy.core._multiarray_umath'), '_reconstruct', None),
        r"_import_module\(str, bool\)": call(imp, 'numpy.core._multiarray_umath', True),
        r"_import_module\('numpy.core'\)": call(imp, 'numpy.core'),
        r'FlatMapping\(list\)': call(stand_ins.flat_mapping, [('w', np.zeros(1))]),
        r'FlatMapping\(dict, dict\)': call(stand_ins.flat_mapping, {}, {}),
        # BUILD into the module would patch numpy's namespace.
        'to set state on dill module numpy.core._multiarray_umath': call(
            imp, 'numpy.core._multiarray_umath', state={'_reconstruct': np.dtype}),
    }
    for expected, attack in {**live_attacks, **refused}.items():
      path = tmp_path / 'attack.npz'
      path.write_bytes(reference_pickle.dumps(stand_ins, {'NFNet/~/linear': {'w': attack}}))
      assert re.search(f'refused (dill |haiku )?{expected}', _load_error(path))
    assert not marker.exists() and not stand_ins.calls
    # The live payloads are real: an ordinary unpickler runs each of them.
    for attack in live_attacks.values():
      pickle.loads(reference_pickle.dumps(stand_ins, attack))
      assert marker.exists()
      marker.unlink()


@pytest.mark.parametrize('protocol', [2, 5])
def test_malicious_pickles_are_refused_without_running(tmp_path, protocol):
  marker = tmp_path / 'pwned'
  # Protocol 2 writes Python 2 names (__builtin__); the error names the global as written.
  call = reference_pickle.Call
  attacks = {
      'posix.system': call(os.system, f'touch {marker}'),
      '(builtins|__builtin__).eval': call(builtins.eval, f'open({str(marker)!r}, "w").close()'),
      '(builtins|__builtin__).exec': call(builtins.exec, f'open({str(marker)!r}, "w").close()'),
  }
  for name, attack in attacks.items():
    path = tmp_path / 'attack.npz'
    path.write_bytes(pickle.dumps({'NFNet/~/linear': {'w': attack}}, protocol=protocol))
    with pytest.raises(pretrained.CheckpointError, match=f'refused to load global {name}'):
      pretrained.load_reference(path)
  assert not marker.exists()
  # The payloads are live: an unrestricted unpickler runs them.
  pickle.loads(pickle.dumps(attacks['(builtins|__builtin__).eval'], protocol=protocol))
  assert marker.exists()


def _load_error(path) -> str:
  """The CheckpointError message of loading `path`; it must be one line naming the file."""
  with pytest.raises(pretrained.CheckpointError) as error:
    pretrained.load_reference(path)
  message = str(error.value)
  assert str(path) in message and '\n' not in message
  return message


def test_truncated_missing_and_non_tree_files_are_reported_with_their_path(tmp_path):
  data = pickle.dumps(SMALL_TREE, protocol=4)
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(data[:len(data) // 2])
  assert 'truncated' in _load_error(truncated)
  empty = tmp_path / 'empty.npz'
  empty.write_bytes(b'')
  assert 'truncated' in _load_error(empty)
  with pytest.raises(pretrained.CheckpointError, match='absent.npz does not exist'):
    pretrained.load_reference(tmp_path / 'absent.npz')
  listing = tmp_path / 'list.npz'
  listing.write_bytes(pickle.dumps([1, 2, 3]))
  assert 'not a Haiku params dict' in _load_error(listing)
  ints = tmp_path / 'ints.npz'
  ints.write_bytes(pickle.dumps({'NFNet/~/linear': {'w': np.arange(3)}}))
  assert 'not a floating-point array' in _load_error(ints)
  not_nfnet = tmp_path / 'not_nfnet.npz'
  not_nfnet.write_bytes(pickle.dumps(SMALL_TREE))
  assert "unknown module 'other'" in _load_error(not_nfnet)


def _zeros_tree(variant):
  # np.zeros is lazily allocated, so full-size trees cost almost nothing here.
  return {m: {n: np.zeros(s, np.float32) for n, s in p.items()}
          for m, p in helpers.nfnet_shapes(variant).items()}


@pytest.mark.parametrize('variant', ['F0', 'F1', 'F2+'])
def test_infer_variant(variant):
  assert nfnet.infer_variant(_zeros_tree(variant)) == variant


def test_wrong_trees_are_rejected_with_the_culprit_named():
  tree = _zeros_tree('F0')
  tree['NFNet/~/nf_block_2/~/conv1']['w'] = np.zeros((3, 3, 64, 256), np.float32)
  with pytest.raises(pretrained.CheckpointError,
                     match=r'nf_block_2/~/conv1/w has shape \(3, 3, 64, 256\), expected'):
    pretrained.recognise(tree)
  tree = _zeros_tree('F0')
  tree['NFNet/~/nf_block/~/attention'] = {'w': np.zeros((2,), np.float32)}
  with pytest.raises(pretrained.CheckpointError,
                     match="unknown module 'NFNet/~/nf_block/~/attention'"):
    pretrained.recognise(tree)
  tree = _zeros_tree('F0')
  del tree['NFNet/~/nf_block_4/~/squeeze_excite/~/linear_1']
  with pytest.raises(pretrained.CheckpointError,
                     match="missing module.*nf_block_4/~/squeeze_excite"):
    pretrained.recognise(tree)
  tree = _zeros_tree('F0')
  tree['NFNet/~/nf_block_13/~/conv0'] = tree['NFNet/~/nf_block_11/~/conv0']
  with pytest.raises(pretrained.CheckpointError, match='not numbered'):
    nfnet.infer_variant(tree)
  tree = _zeros_tree('F0')
  del tree['NFNet/~/final_conv']['gain']
  with pytest.raises(pretrained.CheckpointError, match=r"final_conv has params \['bias', 'w'\]"):
    pretrained.recognise(tree)


# Size of the published F0_haiku.npz, in bytes (spec: "Public reference checkpoints").
PUBLISHED_F0_SIZE = 285_976_842


def test_f0_checkpoint_in_the_reference_layout_loads_and_matches_reference_forward(tmp_path):
  path = helpers.write_reference_checkpoint(tmp_path / 'F0_haiku.npz', helpers.reference_params('F0', seed=3))
  # The layout reproduces the real file's size (measured: 2 bytes short); the size does not
  # depend on the values. Plain dicts instead of FlatMappings would be 1,375 bytes shorter.
  assert abs(path.stat().st_size - PUBLISHED_F0_SIZE) <= 2
  # Loaded with the stand-ins gone: nothing of Haiku's or dill's pickled names is needed.
  loaded, model_config = pretrained.load_reference(path)
  variant = model_config['variant']
  assert variant == 'F0'
  assert nfnet.num_classes_of(loaded) == 1000
  assert sum(leaf.size for leaf in jax.tree.leaves(loaded)) == 71_489_284
  with pytest.raises(pretrained.CheckpointError, match='holds F0, not the requested F1'):
    pretrained.load_reference(path, variant='F1')

  model = hk.transform(
      lambda x: nfnet.NFNet(num_classes=1000, variant=variant)(x, is_training=False))
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  logits = jax.jit(model.apply)(loaded, None, images)
  expected = jax.jit(reference_forward.forward, static_argnums=2)(loaded, images,
                                                                  nfnet.VARIANTS['F0']['depths'])
  assert logits.shape == (2, 1000)
  assert float(np.abs(logits - expected).max() / np.abs(expected).max()) < 1e-4
