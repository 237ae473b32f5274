"""Tests for nfnets.models.nfnet: names, variants, reference equivalence, training mode, signal flow."""
import math

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

from configs import nfnet as nfnet_configs
from nfnets import models
from nfnets.models import nfnet
from tests import helpers
from tests import reference_forward

SMALL = dict(widths=(32, 64, 96, 96), depths=(1, 2, 2, 1), group_width=16)
ALPHA = 0.2


def _abstract_params(variant='F0', num_classes=1000, resolution=32, **kwargs):
  model = hk.transform(lambda x: nfnet.NFNet(num_classes, variant, **kwargs)(x, False))
  image = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return helpers.module_shapes(jax.eval_shape(model.init, jax.random.PRNGKey(0), image))


@pytest.fixture(scope='module')
def small_eval():
  """Jitted eval-mode apply of the small model with metrics, random non-trivial params, inputs."""
  model = hk.without_apply_rng(hk.transform(
      lambda x: nfnet.NFNet(10, **SMALL)(x, is_training=False, return_metrics=True)))
  # Enough examples that channel statistics of the 2x2 last stage are not dominated by noise.
  images = np.random.default_rng(0).normal(size=(48, 33, 33, 3)).astype(np.float32)
  shapes = _abstract_params(num_classes=10, resolution=33, **SMALL)
  return jax.jit(model.apply), reference_forward.random_params(shapes, seed=1), images


def test_variant_table_holds_architecture_and_the_configs_hold_the_recipe():
  assert nfnet.VARIANTS['F0'] == dict(depths=(1, 2, 6, 3), widths=(256, 512, 1536, 1536))
  assert [nfnet.VARIANTS[f'F{i}']['depths'][2] for i in range(8)] == [6 * (i + 1) for i in range(8)]
  assert nfnet.VARIANTS['F3+']['widths'] == (384, 768, 2048, 2048)
  assert nfnet.VARIANTS['F3+']['depths'] == nfnet.VARIANTS['F3']['depths']
  configs = [nfnet_configs.get_config(f'F{i}') for i in range(8)]
  assert [c.data.eval_resolution for c in configs] == [256, 320, 352, 416, 512, 544, 576, 608]
  assert [c.data.train_resolution for c in configs] == [192, 224, 256, 320, 384, 416, 448, 480]
  assert [c.data.randaugment_magnitude for c in configs] == [5, 10, 10, 15, 15, 15, 15, 15]
  assert [c.model.drop_rate for c in configs] == [0.2, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5]
  # The table's SAM rows: F5 both ways, F6 only with SAM.
  assert [nfnet_configs.get_config(a).optimizer.sam_rho for a in ('F5', 'F5-sam', 'F6', 'F6+')] == [
      0.0, 0.05, 0.05, 0.05]
  assert nfnet_configs.get_config('F3+').model.variant == 'F3+'
  with pytest.raises(ValueError, match="unknown NFNet variant 'F9'"):
    nfnet_configs.get_config('F9')


def test_registry_builds_the_family_from_its_config_section():
  family = models.get_family('nfnet')
  assert family.module is nfnet.NFNet and family.classifier_module == 'NFNet/~/linear'
  config = nfnet_configs.get_config('tiny').model
  assert set(config) - {'name'} <= set(nfnet.NFNet.__init__.__code__.co_varnames)
  params, state = models.abstract_params(config)
  assert state == {} and params['NFNet/~/linear']['w'].shape == (256, 10)
  with pytest.raises(models.ConfigError, match="unknown model 'resnet'"):
    models.get_family('resnet')
  with pytest.raises(models.ConfigError, match="unknown compute dtype 'float8'"):
    models.make_forward(config, 'float8')
  models.make_forward(config, 'float16')  # the train step scales the loss for it
  assert models.contradiction(config.to_dict(), dict(config.to_dict(), drop_rate=0.5)) is None
  assert models.contradiction(config.to_dict(), dict(config.to_dict(), variant='F1')) == "variant 'F0' vs 'F1'"


def test_f0_module_names_follow_reference_checkpoints():
  shapes = _abstract_params('F0')
  conv = {'w', 'gain', 'bias'}
  expected = {f'NFNet/~/stem_conv{i}': conv for i in range(4)}
  for i in range(12):
    block = 'NFNet/~/nf_block' + (f'_{i}' if i else '')
    expected[block] = {'skip_gain'}
    for name in ('conv0', 'conv1', 'conv1b', 'conv2'):
      expected[f'{block}/~/{name}'] = conv
    if i in (0, 1, 3, 9):  # First block of each stage (depths 1, 2, 6, 3).
      expected[f'{block}/~/conv_shortcut'] = conv
    expected[f'{block}/~/squeeze_excite/~/linear'] = {'w', 'b'}
    expected[f'{block}/~/squeeze_excite/~/linear_1'] = {'w', 'b'}
  expected['NFNet/~/final_conv'] = conv
  expected['NFNet/~/linear'] = {'w', 'b'}
  assert {m: set(p) for m, p in shapes.items()} == expected
  assert shapes['NFNet/~/stem_conv3']['w'] == (3, 3, 64, 128)
  assert shapes['NFNet/~/nf_block_3/~/conv1']['w'] == (3, 3, 128, 768)  # 6 groups of 128.
  assert shapes['NFNet/~/nf_block_3/~/conv_shortcut']['w'] == (1, 1, 512, 1536)
  assert shapes['NFNet/~/nf_block_1/~/squeeze_excite/~/linear']['w'] == (512, 256)
  assert shapes['NFNet/~/final_conv']['w'] == (1, 1, 1536, 3072)
  assert shapes['NFNet/~/linear']['w'] == (3072, 1000)
  assert shapes['NFNet/~/nf_block']['skip_gain'] == ()
  # The classifier is the only top-level linear (one '/~/' in its path), per project convention.
  assert [m for m in shapes if m.endswith('linear') and m.count('/~/') == 1] == ['NFNet/~/linear']


def test_wide_variant_and_width_multiplier():
  wide = _abstract_params('F0+')
  assert wide['NFNet/~/final_conv']['w'] == (1, 1, 2048, 4096)
  assert wide['NFNet/~/stem_conv3']['w'] == (3, 3, 64, 192)
  half = _abstract_params('F0', width=0.5)
  assert half['NFNet/~/nf_block_9/~/conv2']['w'] == (1, 1, 384, 768)


def test_bad_arguments_raise_clear_errors():
  # Bad arguments are the user's (one-line ConfigErrors); a wrongly shaped input is a bug (a plain ValueError).
  with pytest.raises(models.ConfigError, match=r"unknown nfnet variant 'F9'.*F0, F1"):
    _abstract_params('F9')
  with pytest.raises(models.ConfigError, match=r"Unknown activation 'gleu'"):
    _abstract_params(activation='gleu')
  with pytest.raises(models.ConfigError, match='4 stages'):
    _abstract_params(depths=(1, 2, 3))
  model = hk.transform(lambda x: nfnet.NFNet(10)(x, False))
  with pytest.raises(ValueError, match='NHWC RGB') as raised:
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 3, 32, 32),
                                                                           jnp.float32))
  assert not isinstance(raised.value, models.UserError)


def test_block_betas_follow_expected_std_bookkeeping():
  def betas():
    model = nfnet.NFNet(10, **SMALL, alpha=ALPHA)
    return [b.plan.beta for b in model.blocks], [b.plan.stochdepth_rate for b in model.blocks]

  got_betas, got_rates = hk.transform(betas).apply({}, None)
  var, expected = 1.0, []
  for depth in SMALL['depths']:
    for i in range(depth):
      expected.append(1 / math.sqrt(var))
      var = (1.0 if i == 0 else var) + ALPHA**2
  np.testing.assert_allclose(got_betas, expected, rtol=1e-12)
  assert got_betas[1] == pytest.approx(1 / math.sqrt(1 + ALPHA**2))
  assert got_betas[3] == pytest.approx(1 / math.sqrt(1 + 2 * ALPHA**2))  # After a 2-block stage.
  np.testing.assert_allclose(got_rates, [0.25 * i / 6 for i in range(6)])


def test_small_model_matches_independent_reference(small_eval):
  apply, params, images = small_eval
  out = apply(params, images)
  expected = jax.jit(reference_forward.forward, static_argnums=2)(params, images, SMALL['depths'])
  assert out['logits'].shape == (48, 10)
  assert out['pooled_features'].shape == (48, 192)
  rel = float(jnp.abs(out['logits'] - expected).max() / jnp.abs(expected).max())
  assert rel < 1e-4


def test_cpu_formulation_gradients_match_independent_reference(small_eval):
  """The 'split' convs (per group, 1x1 as matmuls) and the WS statistics differentiate like the spec."""
  _, params, images = small_eval
  images = images[:8]
  model = hk.without_apply_rng(hk.transform(
      lambda x: nfnet.NFNet(10, **SMALL, grouped_conv='split')(x, is_training=False)))
  cotangent = np.random.default_rng(2).normal(size=(8, 10)).astype(np.float32)
  ours = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, images) * cotangent)))(params)
  reference = jax.jit(jax.grad(lambda p: jnp.sum(
      reference_forward.forward(p, images, SMALL['depths']) * cotangent)))(params)
  assert set(ours) == set(reference)
  for module, leaves in reference.items():
    for name, want in leaves.items():
      got = ours[module][name]
      scale = float(jnp.abs(want).max()) + 1e-12
      assert float(jnp.abs(got - want).max()) / scale < 1e-4, (module, name)


def test_signal_propagation_at_init(small_eval):
  apply, params, images = small_eval
  init_like = {m: {n: (np.ones_like(a) if n in ('gain', 'skip_gain') else
                       np.zeros_like(a) if n in ('bias', 'b') else a) for n, a in p.items()}
               for m, p in params.items()}
  stats = apply(init_like, images)['signal_propagation']
  names = ['NFNet/~/nf_block'] + [f'NFNet/~/nf_block_{i}' for i in range(1, 6)]
  assert list(stats) == names
  get = lambda key: np.array([float(stats[n][key]) for n in names])
  avg_var, res_var, sq_mean = get('avg_var'), get('res_avg_var'), get('avg_sq_mean')
  stage_starts = {0, 1, 3, 5}
  for i in set(range(1, 6)) - stage_starts:
    # Inside a stage each block adds alpha^2 times its residual branch's variance (up to the
    # residual's chance correlation with its input in a narrow random network).
    assert avg_var[i] - avg_var[i - 1] == pytest.approx(ALPHA**2 * res_var[i], rel=0.5)
  assert np.all(res_var > 0)
  assert np.all(sq_mean < 0.25 * avg_var)  # Channel means stay near zero (WS zero-mean kernels).

  # True init (skip_gain 0): every block passes its input through, so variance stays flat.
  skip_zero = {m: ({'skip_gain': np.zeros((), np.float32)} if 'skip_gain' in p else p)
               for m, p in init_like.items()}
  flat = apply(skip_zero, images)['signal_propagation']
  for i in set(range(1, 6)) - stage_starts:
    assert float(flat[names[i]]['avg_var']) == pytest.approx(float(flat[names[i - 1]]['avg_var']),
                                                             rel=1e-5)


def test_training_mode_dropout_and_stochastic_depth(small_eval):
  _, params, images = small_eval

  model = hk.transform(
      lambda x, train: nfnet.NFNet(10, **SMALL, drop_rate=0.5, stochdepth_rate=0.5)(x, train))
  noisy = jax.jit(model.apply, static_argnums=3)
  eval_logits = noisy(params, None, images, False)
  train_a = noisy(params, jax.random.PRNGKey(1), images, True)
  train_b = noisy(params, jax.random.PRNGKey(2), images, True)
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_logits)
  np.testing.assert_array_equal(noisy(params, jax.random.PRNGKey(1), images, True), train_a)


def test_eval_mode_ignores_rng_and_training_needs_it(small_eval):
  _, params, images = small_eval
  model = hk.transform(lambda x, train: nfnet.NFNet(10, **SMALL)(x, train))
  logits = jax.eval_shape(lambda p, x: model.apply(p, None, x, False), params, images)
  assert logits.shape == (48, 10)
  with pytest.raises(ValueError, match='PRNGKey'):
    jax.eval_shape(lambda p, x: model.apply(p, None, x, True), params, images)


def test_bfloat16_policy_gives_float32_logits_close_to_float32(small_eval):
  _, params, images = small_eval
  policy = jmp.get_policy('params=float32,compute=bfloat16,output=float32')

  def forward(x):
    with hk.mixed_precision.push_policy(nfnet.NFNet, policy):
      return nfnet.NFNet(10, **SMALL)(x, is_training=False)

  model = hk.without_apply_rng(hk.transform(forward))
  mixed = jax.jit(model.apply)(params, images)
  exact = jax.jit(reference_forward.forward, static_argnums=2)(params, images, SMALL['depths'])
  assert mixed.dtype == jnp.float32
  rel = float(jnp.abs(mixed - exact).max() / jnp.abs(exact).max())
  assert 1e-4 < rel < 0.05  # bf16 rounding is visible (the policy took effect) but small.
