"""AGC against a plain-numpy reading of the paper's formula, plus the exclusion mask and the clip statistic."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets import agc
from nfnets import param_paths

LAMBDA = 0.01
EPS = 1e-3


def numpy_agc(grad, param, clipping=LAMBDA, eps=EPS):
  """The paper's rule, unit by unit; returns (clipped grad as float64, units clipped, units)."""
  grad = np.asarray(grad, np.float64)
  param = np.asarray(param, np.float64)
  axes = None if grad.ndim <= 1 else tuple(range(grad.ndim - 1))
  grad_norm = np.sqrt(np.sum(grad**2, axis=axes, keepdims=True))
  param_norm = np.sqrt(np.sum(param**2, axis=axes, keepdims=True))
  max_norm = clipping * np.maximum(param_norm, eps)
  clip = grad_norm / np.maximum(param_norm, eps) > clipping
  scale = np.where(clip, max_norm / np.maximum(grad_norm, 1e-6), 1.0)
  return grad * scale, int(clip.sum()), clip.size


def grads_with_ratios(rng, param, ratios):
  """A gradient whose unit u has ||G_u|| / max(||W_u||, eps) == ratios[u] (one ratio per unit)."""
  param = np.asarray(param, np.float64)
  axes = None if param.ndim <= 1 else tuple(range(param.ndim - 1))
  direction = rng.normal(size=param.shape)
  direction /= np.sqrt(np.sum(direction**2, axis=axes, keepdims=True))
  param_norm = np.maximum(np.sqrt(np.sum(param**2, axis=axes, keepdims=True)), EPS)
  return (direction * param_norm * LAMBDA * np.reshape(ratios, param_norm.shape)).astype(np.float32)


def mixed_ratios(rng, num_units):
  """Ratios to lambda well above and well below 1, both present whenever there are two units or more."""
  ratios = np.exp(rng.uniform(np.log(0.2), np.log(5.0), size=num_units))
  ratios[0] = 0.5
  if num_units > 1:
    ratios[1] = 2.0
  return ratios


def haiku_tree(rng):
  """Every leaf kind AGC meets, in Haiku layout with NFNet module names, plus degenerate shapes."""
  shapes = {
      'NFNet/~/stem_conv0': {'w': (3, 3, 3, 16), 'gain': (16,), 'bias': (16,)},
      'NFNet/~/nf_block/~/conv1': {'w': (3, 3, 8, 12), 'gain': (12,), 'bias': (12,)},
      'NFNet/~/nf_block/~/pointwise': {'w': (1, 1, 1, 5)},
      'NFNet/~/nf_block/~/squeeze_excite/~/linear': {'w': (12, 6), 'b': (6,)},
      'NFNet/~/nf_block/~/squeeze_excite/~/linear_1': {'w': (1, 12), 'b': (12,)},
      'NFNet/~/nf_block': {'skip_gain': ()},
      'NFNet/~/linear': {'w': (12, 10), 'b': (10,)},
  }
  return {module: {name: rng.normal(size=shape).astype(np.float32) for name, shape in leaves.items()}
          for module, leaves in shapes.items()}


def num_units(shape):
  return 1 if len(shape) <= 1 else shape[-1]


def random_case(seed):
  rng = np.random.default_rng(seed)
  params = haiku_tree(rng)
  grads = jax.tree.map(lambda p: grads_with_ratios(rng, p, mixed_ratios(rng, num_units(p.shape))), params)
  return params, grads


def apply(transform, grads, params):
  state = transform.init(params)
  updates, state = jax.jit(transform.update)(grads, state, params)
  return updates, state


@pytest.mark.parametrize('seed', [0, 1])
def test_clip_matches_numpy_formula_on_every_leaf_kind(seed):
  params, grads = random_case(seed)
  updates, state = apply(agc.adaptive_grad_clip(LAMBDA, EPS, exclude=None), grads, params)
  total_clipped = total_units = 0
  for module, leaves in params.items():
    for name, param in leaves.items():
      expected, clipped, units = numpy_agc(grads[module][name], param)
      total_clipped += clipped
      total_units += units
      np.testing.assert_allclose(updates[module][name], expected, rtol=2e-5, atol=1e-9,
                                 err_msg=f'{module}/{name}')
  assert 0 < total_clipped < total_units  # both branches of the rule were exercised
  np.testing.assert_allclose(agc.clipped_fraction(state), total_clipped / total_units, rtol=1e-6)


def test_degenerate_shapes_are_clipped_per_output_unit():
  # A (1, O) linear and a (1, 1, 1, O) kernel: each output column is its own unit, unlike a vector.
  rng = np.random.default_rng(3)
  param = rng.normal(size=(1, 1, 1, 4)).astype(np.float32)
  grad = grads_with_ratios(rng, param, np.array([0.5, 2.0, 0.5, 2.0]))
  updates, state = apply(agc.adaptive_grad_clip(LAMBDA, EPS, exclude=None), {'m': {'w': grad}},
                         {'m': {'w': param}})
  np.testing.assert_allclose(updates['m']['w'], numpy_agc(grad, param)[0], rtol=2e-5)
  np.testing.assert_allclose(updates['m']['w'][..., 0], grad[..., 0])
  assert float(agc.clipped_fraction(state)) == pytest.approx(0.5)


def test_bfloat16_grads_keep_dtype_and_use_float32_norms():
  params, grads = random_case(4)
  grads_bf16 = jax.tree.map(lambda g: jnp.asarray(g, jnp.bfloat16), grads)
  updates, _ = apply(agc.adaptive_grad_clip(LAMBDA, EPS, exclude=None), grads_bf16, params)
  for module, leaves in params.items():
    for name, param in leaves.items():
      update = updates[module][name]
      assert update.dtype == jnp.bfloat16
      expected, _, _ = numpy_agc(np.asarray(grads_bf16[module][name], np.float32), param)
      # One bfloat16 rounding of the result (8-bit mantissa), nothing more.
      np.testing.assert_allclose(np.asarray(update, np.float32), expected, rtol=2**-8, atol=1e-12)


def test_zero_params_still_get_a_gradient_of_norm_lambda_eps():
  params = {'NFNet/~/nf_block': {'skip_gain': np.zeros((), np.float32)},
            'NFNet/~/conv': {'w': np.zeros((3, 3, 2, 4), np.float32)}}
  grads = {'NFNet/~/nf_block': {'skip_gain': np.float32(-3.0)},
           'NFNet/~/conv': {'w': np.ones((3, 3, 2, 4), np.float32)}}
  updates, _ = apply(agc.adaptive_grad_clip(LAMBDA, EPS), grads, params)
  assert float(updates['NFNet/~/nf_block']['skip_gain']) == pytest.approx(-LAMBDA * EPS, rel=1e-5)
  unit_norms = np.sqrt(np.sum(np.square(updates['NFNet/~/conv']['w']), axis=(0, 1, 2)))
  np.testing.assert_allclose(unit_norms, LAMBDA * EPS, rtol=1e-5)


def test_default_exclusion_skips_only_the_classifier_weight():
  params, grads = random_case(5)
  # Make every unit exceed lambda so that "untouched" can only mean "excluded".
  grads = jax.tree.map(lambda g: g * 100.0, grads)
  updates, state = apply(agc.adaptive_grad_clip(LAMBDA, EPS), grads, params)
  np.testing.assert_array_equal(updates['NFNet/~/linear']['w'], grads['NFNet/~/linear']['w'])
  for module, leaves in params.items():
    for name, param in leaves.items():
      if (module, name) == ('NFNet/~/linear', 'w'):
        continue
      np.testing.assert_allclose(updates[module][name], numpy_agc(grads[module][name], param)[0], rtol=2e-5,
                                 err_msg=f'{module}/{name}')
  assert float(agc.clipped_fraction(state)) == 1.0  # the excluded leaf's units are not counted


@pytest.mark.parametrize('path, expected', [
    (('NFNet/~/linear', 'w'), True),
    (('ResNet/~/linear', 'w'), True),
    (('NFNet/~/linear', 'b'), False),
    (('NFNet/~/nf_block/~/squeeze_excite/~/linear', 'w'), False),
    (('NFNet/~/linear_1', 'w'), False),
    (('linear', 'w'), False),
    (('NFNet/~/final_conv', 'w'), False),
])
def test_is_final_classifier_weight(path, expected):
  assert param_paths.is_final_classifier_weight(path) is expected


def test_custom_exclude_predicate():
  params, grads = random_case(6)
  grads = jax.tree.map(lambda g: g * 100.0, grads)
  updates, _ = apply(agc.adaptive_grad_clip(LAMBDA, EPS, exclude=lambda path: path[1] == 'bias'), grads, params)
  np.testing.assert_array_equal(updates['NFNet/~/stem_conv0']['bias'], grads['NFNet/~/stem_conv0']['bias'])
  np.testing.assert_allclose(updates['NFNet/~/linear']['w'],
                             numpy_agc(grads['NFNet/~/linear']['w'], params['NFNet/~/linear']['w'])[0], rtol=2e-5)


def test_clipped_fraction_found_through_wrappers_and_none_without_agc():
  params, grads = random_case(7)
  wrapped = optax.contrib.sam(
      optax.chain(agc.adaptive_grad_clip(LAMBDA), optax.adam(1e-3)),
      optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True)
  state = wrapped.init(params)
  _, state = jax.jit(lambda g, s, p: wrapped.update(g, s, p, grad_fn=lambda q, _: g))(grads, state, params)
  expected = sum(numpy_agc(grads[m][n], params[m][n])[1] for m in params for n in params[m]
                 if (m, n) != ('NFNet/~/linear', 'w'))
  units = sum(num_units(params[m][n].shape) for m in params for n in params[m]) - 10
  np.testing.assert_allclose(agc.clipped_fraction(state), expected / units, rtol=1e-6)
  assert agc.clipped_fraction(optax.sgd(0.1).init(params)) is None


def test_update_without_params_and_bad_settings_raise():
  params, grads = random_case(8)
  transform = agc.adaptive_grad_clip(LAMBDA)
  with pytest.raises(ValueError, match='params'):
    transform.update(grads, transform.init(params), None)
  with pytest.raises(ValueError, match='clipping'):
    agc.adaptive_grad_clip(0.0)
  with pytest.raises(ValueError, match='eps'):
    agc.adaptive_grad_clip(0.01, eps=0.0)


def test_exclusion_mask_on_a_real_nfnet_param_tree():
  import haiku as hk
  from nfnets.models import nfnet
  forward = hk.transform(lambda x: nfnet.NFNet(num_classes=10, variant='F0', depths=(1, 1, 1, 1),
                                               widths=(32, 64, 96, 128))(x, is_training=True))
  shapes = jax.eval_shape(forward.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  mask = param_paths.path_mask(shapes, lambda path, _: param_paths.is_final_classifier_weight(path))
  excluded = [(m, n) for m in mask for n in mask[m] if mask[m][n]]
  assert excluded == [('NFNet/~/linear', 'w')]
  assert any('squeeze_excite' in m for m in mask)  # the nested linears were there to be (not) matched
