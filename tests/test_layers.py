"""Tests for nfnets.models.layers: WS conv, gamma activations, squeeze-excite, stochastic depth."""
import math

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest
from scipy import integrate

from nfnets.models import layers


def _exact_gamma(fn) -> float:
  pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
  moment = lambda k: sum(integrate.quad(lambda z: float(fn(z))**k * pdf(z), a, b)[0]
                         for a, b in ((-12, 0), (0, 12)))
  return 1.0 / math.sqrt(moment(2) - moment(1)**2)


@pytest.mark.parametrize('name', layers.activation_names())
def test_activation_gamma_preserves_unit_variance(name):
  raw = layers._ACTIVATIONS[name][0]
  exact = _exact_gamma(lambda z: raw(jnp.float32(z)))
  # The published gammas were estimated from samples; they agree with the exact value to ~0.1%.
  assert layers.activation_gamma(name) == pytest.approx(exact, rel=1e-3)


def test_scaled_activation_applies_gamma_and_keeps_dtype():
  x = jnp.linspace(-3, 3, 7, dtype=jnp.bfloat16)
  out = layers.get_activation('relu')(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(out), np.float32(jnp.maximum(x, 0) * 1.7139588594436646),
                             rtol=1e-2)


def test_unknown_activation_lists_known_names():
  with pytest.raises(ValueError, match=r"Unknown activation 'swish'.*gelu.*relu"):
    layers.get_activation('swish')


def _conv_fn(**kwargs):
  return hk.without_apply_rng(hk.transform(lambda x: layers.WSConv2D(**kwargs, name='conv')(x)))


def _random_params(fn, x, seed=0):
  """Non-trivial params without running (and compiling) the random initialisers."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(fn.init, jax.random.PRNGKey(0), x)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(1.0, 0.5, a.shape), jnp.float32), abstract)


def test_ws_conv_init_and_standardised_kernel():
  fn = _conv_fn(output_channels=256, kernel_shape=3, feature_group_count=2)
  params = fn.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 128)))['conv']
  assert {k: v.shape for k, v in params.items()} == {
      'w': (3, 3, 64, 256), 'gain': (256,), 'bias': (256,)}
  np.testing.assert_array_equal(params['gain'], 1.0)
  np.testing.assert_array_equal(params['bias'], 0.0)
  # Variance scaling (1.0, fan_in, normal): fan_in counts input channels per group.
  assert float(jnp.var(params['w'])) == pytest.approx(1.0 / (9 * 64), rel=0.05)
  kernel = layers.standardize_weight(params['w'] * 3.0 + 1.0, jnp.full((256,), 2.0))
  np.testing.assert_allclose(kernel.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
  # (W - mean) / sqrt(var * fan_in) has unit squared norm per output channel; gain scales it.
  np.testing.assert_allclose(jnp.sum(kernel**2, axis=(0, 1, 2)), 4.0, rtol=1e-5)


@pytest.mark.parametrize('size', [7, 8])
def test_ws_conv_stride2_uses_tensorflow_same_padding(size):
  fn = _conv_fn(output_channels=3, kernel_shape=3, stride=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, size, size, 2)), jnp.float32)
  params = _random_params(fn, x)
  out = fn.apply(params, x)
  p = params['conv']
  kernel = layers.standardize_weight(p['w'], p['gain'])
  # TF 'SAME' with stride 2: total pad = max((ceil(n/2)-1)*2 + 3 - n, 0), the extra on the end.
  total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
  pad = (total // 2, total - total // 2)
  expected = jax.lax.conv_general_dilated(x, kernel, (2, 2), [pad, pad],
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['bias']
  assert out.shape == (1, -(-size // 2), -(-size // 2), 3)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _standardize_weight_as_published(weight, gain, eps=1e-4):
  """The reference's formulation: statistics over the kernel's (H, W, I) axes."""
  mean = jnp.mean(weight, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(weight, axis=(0, 1, 2), keepdims=True)
  fan_in = math.prod(weight.shape[:-1])
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  return weight * scale - mean * scale


@pytest.mark.parametrize('shape', [(3, 3, 16, 24), pytest.param((1, 1, 48, 8), marks=pytest.mark.slow),
                                   pytest.param((1, 1, 1, 4), marks=pytest.mark.slow)])
def test_standardised_kernel_and_its_gradient_match_the_published_formulation(shape):
  rng = np.random.default_rng(0)
  weight = jnp.asarray(rng.normal(0.3, 2.0, shape), jnp.float32)
  gain = jnp.asarray(rng.normal(1.0, 0.5, shape[-1:]), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours = lambda w, g: jnp.sum(layers.standardize_weight(w, g) * cotangent)
  published = lambda w, g: jnp.sum(_standardize_weight_as_published(w, g) * cotangent)
  np.testing.assert_allclose(layers.standardize_weight(weight, gain),
                             _standardize_weight_as_published(weight, gain), rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.grad(ours, (0, 1))(weight, gain), jax.grad(published, (0, 1))(weight, gain)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kernel_shape,stride,groups', [
    (3, 2, 3), pytest.param(3, 1, 4, marks=pytest.mark.slow), pytest.param(3, 1, 1, marks=pytest.mark.slow),
    (1, 1, 1), (1, 2, 1)])
def test_split_formulation_matches_native_outputs_and_gradients(kernel_shape, stride, groups):
  """'split' (per-group convs, 1x1 convs as matmuls) computes what one lax conv computes."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 7, 12)), jnp.float32)
  kwargs = dict(output_channels=24, kernel_shape=kernel_shape, stride=stride, feature_group_count=groups)
  native = _conv_fn(**kwargs, grouped_conv='native')
  split = _conv_fn(**kwargs, grouped_conv='split')
  params = _random_params(native, x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, jax.eval_shape(split.init, jax.random.PRNGKey(0), x))
  out = native.apply(params, x)
  np.testing.assert_allclose(split.apply(params, x), out, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
  grads = lambda fn: jax.grad(lambda p, x: jnp.sum(fn.apply(p, x) * cotangent), (0, 1))(params, x)
  for got, want in zip(jax.tree.leaves(grads(split)), jax.tree.leaves(grads(native))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ws_conv_rejects_bad_groups_and_mode():
  with pytest.raises(ValueError, match='grouped_conv mode'):
    layers.resolve_grouped_conv('fast')
  fn = _conv_fn(output_channels=4, kernel_shape=1, feature_group_count=2)
  with pytest.raises(ValueError, match='not divisible by 2 groups'):
    fn.init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 3)))


def test_ws_statistics_use_float32_master_weights_under_bf16_policy():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 8)), jnp.float32)
  fn = _conv_fn(output_channels=4, kernel_shape=3)
  params = _random_params(fn, x)
  # A large common offset: bf16 (8-bit mantissa) rounds the spread away, f32 keeps it.
  params = {'conv': dict(params['conv'], w=params['conv']['w'] * 0.05 + 100.0)}
  reference = fn.apply(params, x)
  policy = jmp.get_policy('params=float32,compute=bfloat16,output=float32')
  with hk.mixed_precision.push_policy(layers.WSConv2D, policy):
    mixed = fn.apply(params, x)
  assert mixed.dtype == jnp.float32
  scale = float(jnp.abs(reference).max())
  assert float(jnp.abs(mixed - reference).max()) < 0.05 * scale


def test_squeeze_excite_names_and_range():
  fn = hk.without_apply_rng(hk.transform(lambda x: layers.SqueezeExcite(8, 0.5)(x)))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 8)), jnp.float32)
  params = _random_params(fn, x)
  assert {k: {n: a.shape for n, a in v.items()} for k, v in params.items()} == {
      'squeeze_excite/~/linear': {'w': (8, 4), 'b': (4,)},
      'squeeze_excite/~/linear_1': {'w': (4, 8), 'b': (8,)}}
  gate = fn.apply(params, x)
  assert gate.shape == (2, 1, 1, 8)
  assert bool(jnp.all((gate > 0) & (gate < 1)))


def test_stochastic_depth_drops_whole_examples_without_rescaling():
  fn = hk.transform(lambda x, t: layers.stochastic_depth(x, 0.5, t))
  x = jnp.ones((512, 2, 2, 3))
  assert fn.apply({}, None, x, False) is x
  out = fn.apply({}, jax.random.PRNGKey(0), x, True)
  per_example = out.reshape(512, -1)
  assert bool(jnp.all((per_example == 0).all(axis=1) | (per_example == 1).all(axis=1)))
  assert 0.4 < float(per_example[:, 0].mean()) < 0.6
  np.testing.assert_array_equal(fn.apply({}, jax.random.PRNGKey(0), x * 2, True), out * 2)


@pytest.mark.parametrize('stride,size', [(1, 6), (2, 7), (2, 1)])
def test_shifted_grouped_conv_matches_native(stride, size):
  rng = np.random.default_rng(stride * 10 + size)
  x = jnp.asarray(rng.normal(size=(2, size, size + 2, 24)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 36)), jnp.float32)
  native = layers.convolve(x, kernel, stride, 3, 'native')
  shifted = layers.convolve(x, kernel, stride, 3, 'shifted')
  assert shifted.shape == native.shape == (2, -(-size // stride), -(-(size + 2) // stride), 36)
  np.testing.assert_allclose(shifted, native, rtol=1e-5, atol=1e-5)


def test_auto_grouped_conv_on_cpu_splits_few_groups_and_shifts_many():
  assert jax.default_backend() == 'cpu'
  assert layers.resolve_grouped_conv('auto', 1) == 'split'
  assert layers.resolve_grouped_conv('auto', layers.MAX_SPLIT_GROUPS) == 'split'
  assert layers.resolve_grouped_conv('auto', layers.MAX_SPLIT_GROUPS + 1) == 'shifted'
  assert layers.resolve_grouped_conv('native', 93) == 'native'


def test_plain_conv_and_unscaled_activation():
  fn = hk.without_apply_rng(hk.transform(lambda x: layers.Conv2D(6, 3, stride=2, feature_group_count=2,
                                                                  name='conv')(x)))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 5, 4)), jnp.float32)
  params = _random_params(fn, x)
  assert jax.tree.map(jnp.shape, params) == {'conv': {'w': (3, 3, 2, 6)}}
  expected = jax.lax.conv_general_dilated(x, params['conv']['w'], (2, 2), 'SAME', feature_group_count=2,
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(fn.apply(params, x), expected, rtol=1e-5, atol=1e-5)
  z = jnp.linspace(-2, 2, 5)
  np.testing.assert_array_equal(layers.get_activation('gelu', scaled=False)(z), jax.nn.gelu(z))


def test_block_schedule_resets_the_expected_variance_at_each_stage_and_grows_it_by_alpha_squared():
  alpha = 0.3
  plans = layers.block_schedule(8, (16, 32, 32), (2, 3, 1), (1, 2, 2), alpha=alpha, stochdepth_rate=0.6)
  assert [(p.index, p.index_in_stage, p.in_channels, p.out_channels, p.stride) for p in plans] == [
      (0, 0, 8, 16, 1), (1, 1, 16, 16, 1),
      (2, 0, 16, 32, 2), (3, 1, 32, 32, 1), (4, 2, 32, 32, 1),
      (5, 0, 32, 32, 2)]
  # A block's input is the previous block's output: 1 for the stem's; a transition's (projected) shortcut
  # restarts the variance at 1, to which each block adds alpha^2.
  input_vars = [1.0, 1 + alpha**2, 1 + 2 * alpha**2, 1 + alpha**2, 1 + 2 * alpha**2, 1 + 3 * alpha**2]
  np.testing.assert_allclose([p.beta for p in plans], [1 / math.sqrt(v) for v in input_vars], rtol=1e-12)
  output_vars = [1 + alpha**2, 1 + 2 * alpha**2, 1 + alpha**2, 1 + 2 * alpha**2, 1 + 3 * alpha**2, 1 + alpha**2]
  np.testing.assert_allclose([p.expected_var for p in plans], output_vars, rtol=1e-12)
  np.testing.assert_allclose([p.stochdepth_rate for p in plans], [0.6 * i / 6 for i in range(6)])
  assert [p.has_projection for p in plans] == [True, False, True, False, False, True]
  # Without the bookkeeping (normalised networks) every beta is 1.
  assert {p.beta for p in layers.block_schedule(8, (16, 32), (2, 2), (1, 2), alpha=0.0, stochdepth_rate=0.0)} == {1.0}


def test_nf_merge_is_stochastic_depth_then_skip_gain_then_alpha_plus_the_shortcut():
  def merge(residual, shortcut, is_training):
    return layers.nf_merge(residual, shortcut, alpha=0.2, stochdepth_rate=0.5, is_training=is_training)

  fn = hk.transform(merge)
  rng = np.random.default_rng(0)
  residual, shortcut = (jnp.asarray(rng.normal(size=(64, 2, 2, 3)), jnp.float32) for _ in range(2))
  params = fn.init(jax.random.PRNGKey(0), residual, shortcut, True)
  assert jax.tree.map(jnp.shape, params) == {'~': {'skip_gain': ()}}
  assert float(params['~']['skip_gain']) == 0.0  # every block starts as the identity
  np.testing.assert_array_equal(fn.apply(params, None, residual, shortcut, False), residual * 0.0 * 0.2 + shortcut)
  params = {'~': {'skip_gain': jnp.float32(1.5)}}
  np.testing.assert_allclose(fn.apply(params, None, residual, shortcut, False), residual * 1.5 * 0.2 + shortcut,
                             rtol=1e-6)
  out = fn.apply(params, jax.random.PRNGKey(1), residual, shortcut, True)
  kept = layers.stochastic_depth  # same key, same draw: the merge drops exactly what stochastic depth drops
  dropped = hk.transform(lambda x: kept(x, 0.5, True)).apply({}, jax.random.PRNGKey(1), residual)
  np.testing.assert_allclose(out, dropped * 1.5 * 0.2 + shortcut, rtol=1e-6)


def test_shortcut_is_the_input_or_a_projection_average_pooled_when_asked():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 3)), jnp.float32)
  preactivated = 2 * x
  assert layers.shortcut(x, preactivated, None, pool_stride=2) is x
  identity = lambda h: h
  np.testing.assert_array_equal(layers.shortcut(x, preactivated, identity), preactivated)
  pooled = layers.shortcut(x, preactivated, identity, pool_stride=2)
  np.testing.assert_allclose(pooled, preactivated.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)), rtol=1e-6)
