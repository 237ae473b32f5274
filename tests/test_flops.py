"""Tests for nfnets.flops: MAC counting and the published parameter / MAC tables."""
import jax
import jax.numpy as jnp
import pytest

from configs.nfnet import PUBLISHED
from configs.nfnet import RECIPES
from nfnets import flops
from nfnets import models

# Published MACs at the test resolution (billions) and parameter counts (millions), F0's MACs aside.
PUBLISHED_MACS = {v: (RECIPES[v]['eval_resolution'], PUBLISHED[v]['macs_billions'])
                  for v in ('F1', 'F2', 'F3', 'F4', 'F5', 'F6')}
PUBLISHED_PARAMS = {v: row['params_millions'] for v, row in PUBLISHED.items() if '-' not in v}


def _cheap_first(names, num_fast):
  """Tracing large variants takes seconds each; the biggest ones run only with `-m slow`."""
  return [pytest.param(n, marks=() if i < num_fast else pytest.mark.slow)
          for i, n in enumerate(sorted(names))]


def _spec(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_grouped_strided_conv_macs():
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4)
  # Output 2x5x5x32; each output element sums 3*3*(16/4) products.
  assert flops.count_macs(conv, _spec(2, 10, 10, 16), _spec(3, 3, 4, 32)) == 2 * 25 * 32 * 36


def test_dot_general_macs_with_batch_dims():
  fn = lambda a, b: jnp.einsum('bij,bjk->bik', a, b)
  assert flops.count_macs(fn, _spec(3, 4, 5), _spec(3, 5, 6)) == 3 * 4 * 5 * 6


def test_macs_recurse_into_sub_jaxprs():
  a, b = _spec(4, 8), _spec(8, 16)
  assert flops.count_macs(lambda a, b: jax.jit(jnp.dot)(a, b), a, b) == 512
  assert flops.count_macs(jax.checkpoint(lambda a, b: a @ b), a, b) == 512
  scanned = lambda a, b: jax.lax.scan(lambda c, _: (c, a @ b), 0.0, None, length=3)[1]
  assert flops.count_macs(scanned, a, b) == 3 * 512
  # The backward pass of a matmul costs two matmuls of the same size.
  assert flops.count_macs(jax.grad(lambda a, b: (a @ b).sum()), a, b) == 2 * 512


def _model(variant):
  return models.model_config('nfnet', variant).to_dict()


def test_f0_macs_match_published():
  assert flops.model_macs(_model('F0'), 256) / 1e9 == pytest.approx(PUBLISHED['F0']['macs_billions'], rel=5e-3)
  assert flops.model_macs(_model('F0'), 192) / 1e9 == pytest.approx(6.98, rel=5e-3)


@pytest.mark.parametrize('variant', _cheap_first(PUBLISHED_MACS, 2))
def test_larger_variant_macs_match_published(variant):
  resolution, billions = PUBLISHED_MACS[variant]
  assert flops.model_macs(_model(variant), resolution) / 1e9 == pytest.approx(billions, rel=5e-3)


@pytest.mark.parametrize('variant', _cheap_first(PUBLISHED_PARAMS, 3))
def test_parameter_counts_match_published(variant):
  assert flops.model_param_count(_model(variant)) / 1e6 == pytest.approx(PUBLISHED_PARAMS[variant],
                                                                 abs=0.005)


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown nfnet variant 'F10'"):
    flops.model_macs(dict(_model('F0'), variant='F10'), 224)
