"""Tests for nfnets.pretrained: the restricted unpickler and the checkpoint tree checks."""
import builtins
import os
import pickle
import pickletools
import sys
import types

import haiku as hk
import jax
import numpy as np
import pytest

from nfnets import nfnet
from nfnets import pretrained
from tests import reference_forward

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
  bad = pickle.dumps({'m': {'w': _Reduce(create, (np.dtype, ('f4',), None, None))}}, protocol=2)
  with pytest.raises(pretrained.CheckpointError, match='constructor other than numpy'):
    pretrained.safe_unpickle(bad)


class _Reduce:
  """Pickles as an arbitrary call `fn(*args)`: how a malicious file embeds code."""

  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize('protocol', [2, 5])
def test_malicious_pickles_are_refused_without_running(tmp_path, protocol):
  marker = tmp_path / 'pwned'
  # Protocol 2 writes Python 2 names (__builtin__); the error names the global as written.
  attacks = {
      'posix.system': _Reduce(os.system, (f'touch {marker}',)),
      '(builtins|__builtin__).eval': _Reduce(builtins.eval,
                                             (f'open({str(marker)!r}, "w").close()',)),
      '(builtins|__builtin__).exec': _Reduce(builtins.exec,
                                             (f'open({str(marker)!r}, "w").close()',)),
  }
  for name, attack in attacks.items():
    path = tmp_path / 'attack.npz'
    path.write_bytes(pickle.dumps({'NFNet/~/linear': {'w': attack}}, protocol=protocol))
    with pytest.raises(pretrained.CheckpointError, match=f'refused to load global {name}'):
      pretrained.load_official_params(path)
  assert not marker.exists()
  # The payloads are live: an unrestricted unpickler runs them.
  pickle.loads(pickle.dumps(attacks['(builtins|__builtin__).eval'], protocol=protocol))
  assert marker.exists()


def test_truncated_missing_and_non_tree_files(tmp_path):
  data = pickle.dumps(SMALL_TREE, protocol=4)
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(pretrained.CheckpointError, match='truncated'):
    pretrained.load_official_params(truncated)
  empty = tmp_path / 'empty.npz'
  empty.write_bytes(b'')
  with pytest.raises(pretrained.CheckpointError, match='truncated'):
    pretrained.load_official_params(empty)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    pretrained.load_official_params(tmp_path / 'absent.npz')
  listing = tmp_path / 'list.npz'
  listing.write_bytes(pickle.dumps([1, 2, 3]))
  with pytest.raises(pretrained.CheckpointError, match='not a Haiku params dict'):
    pretrained.load_official_params(listing)
  ints = tmp_path / 'ints.npz'
  ints.write_bytes(pickle.dumps({'NFNet/~/linear': {'w': np.arange(3)}}))
  with pytest.raises(pretrained.CheckpointError, match='not a floating-point array'):
    pretrained.load_official_params(ints)


def _zeros_tree(variant):
  # np.zeros is lazily allocated, so full-size trees cost almost nothing here.
  return {m: {n: np.zeros(s, np.float32) for n, s in p.items()}
          for m, p in pretrained.expected_shapes(variant).items()}


@pytest.mark.parametrize('variant', ['F0', 'F1', 'F2+'])
def test_infer_variant(variant):
  assert pretrained.infer_variant(_zeros_tree(variant)) == variant


def test_wrong_trees_are_rejected_with_the_culprit_named():
  tree = _zeros_tree('F0')
  tree['NFNet/~/nf_block_2/~/conv1']['w'] = np.zeros((3, 3, 64, 256), np.float32)
  with pytest.raises(pretrained.CheckpointError,
                     match=r'nf_block_2/~/conv1/w has shape \(3, 3, 64, 256\), expected'):
    pretrained.check_params(tree, 'F0')
  tree = _zeros_tree('F0')
  tree['NFNet/~/nf_block/~/attention'] = {'w': np.zeros((2,), np.float32)}
  with pytest.raises(pretrained.CheckpointError,
                     match="unknown module 'NFNet/~/nf_block/~/attention'"):
    pretrained.check_params(tree, 'F0')
  tree = _zeros_tree('F0')
  del tree['NFNet/~/nf_block_4/~/squeeze_excite/~/linear_1']
  with pytest.raises(pretrained.CheckpointError,
                     match="missing module.*nf_block_4/~/squeeze_excite"):
    pretrained.check_params(tree, 'F0')
  tree = _zeros_tree('F0')
  tree['NFNet/~/nf_block_13/~/conv0'] = tree['NFNet/~/nf_block_11/~/conv0']
  with pytest.raises(pretrained.CheckpointError, match='not numbered'):
    pretrained.infer_variant(tree)
  tree = _zeros_tree('F0')
  del tree['NFNet/~/final_conv']['gain']
  with pytest.raises(pretrained.CheckpointError, match=r"final_conv has params \['bias', 'w'\]"):
    pretrained.check_params(tree, 'F0')


def test_f0_checkpoint_loads_and_matches_reference_forward(tmp_path):
  shapes = pretrained.expected_shapes('F0', num_classes=1000)
  params = reference_forward.random_params(shapes, seed=3)
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(pickle.dumps(params, protocol=4))
  loaded, variant = pretrained.load_official_params(path)
  assert variant == 'F0'
  assert pretrained.num_classes_of(loaded) == 1000
  assert pretrained.param_count(loaded) == 71_489_284
  with pytest.raises(pretrained.CheckpointError, match='holds NFNet-F0, not the requested'):
    pretrained.load_official_params(path, variant='F1')

  model = hk.transform(
      lambda x: nfnet.NFNet(num_classes=1000, variant=variant)(x, is_training=False))
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  logits = jax.jit(model.apply)(loaded, None, images)
  expected = jax.jit(reference_forward.forward, static_argnums=2)(loaded, images,
                                                                  nfnet.VARIANTS['F0']['depths'])
  assert logits.shape == (2, 1000)
  assert float(np.abs(logits - expected).max() / np.abs(expected).max()) < 1e-4
