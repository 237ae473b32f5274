"""An independent, functional NFNet forward pass (jax.lax + jnp, no Haiku), written from the spec.

It reads a reference-format params dict {'NFNet/~/...': {'w', 'gain', 'bias', ...}} and is used
by the tests as ground truth for the Haiku model. It shares no code with `nfnets`.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

_GELU_GAMMA = 1.7015043497085571


def _act(x):
  tanh_gelu = 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
  return tanh_gelu * _GELU_GAMMA


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _ws_conv(p, x, stride=1):
  w, gain, bias = p['w'], p['gain'], p['bias']
  kh, kw, cin_per_group, _ = w.shape
  mean = w.mean(axis=(0, 1, 2))
  var = ((w - mean)**2).mean(axis=(0, 1, 2))
  fan_in = kh * kw * cin_per_group
  w_hat = (w - mean) * gain / jnp.sqrt(jnp.maximum(var * fan_in, 1e-4))
  pads = [_same_pads(x.shape[1], kh, stride), _same_pads(x.shape[2], kw, stride)]
  y = jax.lax.conv_general_dilated(
      x, w_hat, (stride, stride), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1] // cin_per_group, precision=jax.lax.Precision.HIGHEST)
  return y + bias


def _avg_pool_2x2_same(x):
  """2x2/2 average pool, TF 'SAME': odd sizes get one padded row/col, excluded from the mean."""
  n, h, w, c = x.shape
  ph, pw = h % 2, w % 2
  ones = jnp.ones((1, h, w, 1), x.dtype)
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  ones = jnp.pad(ones, ((0, 0), (0, ph), (0, pw), (0, 0)))
  window_sum = lambda t: t.reshape(t.shape[0], t.shape[1] // 2, 2, t.shape[2] // 2, 2,
                                   t.shape[3]).sum(axis=(2, 4))
  return window_sum(x) / window_sum(ones)


def _dense(p, x):
  return jnp.dot(x, p['w'], precision=jax.lax.Precision.HIGHEST) + p['b']


def forward(params, images, depths, alpha=0.2):
  """Eval-mode logits of the NFNet described by `params` (tanh-GELU, stage strides 1,2,2,2)."""
  p = lambda name: params[f'NFNet/~/{name}']
  x = _act(_ws_conv(p('stem_conv0'), images, 2))
  x = _act(_ws_conv(p('stem_conv1'), x))
  x = _act(_ws_conv(p('stem_conv2'), x))
  x = _ws_conv(p('stem_conv3'), x, 2)
  block = 0
  expected_var = 1.0
  for stage, depth in enumerate(depths):
    for i in range(depth):
      prefix = 'nf_block' + (f'_{block}' if block else '')
      sub = lambda name: p(f'{prefix}/~/{name}')
      stride = 2 if (i == 0 and stage > 0) else 1
      h = _act(x) / math.sqrt(expected_var)
      if stride == 2:
        shortcut = _ws_conv(sub('conv_shortcut'), _avg_pool_2x2_same(h))
      elif f'NFNet/~/{prefix}/~/conv_shortcut' in params:
        shortcut = _ws_conv(sub('conv_shortcut'), h)
      else:
        shortcut = x
      r = _ws_conv(sub('conv0'), h)
      r = _ws_conv(sub('conv1'), _act(r), stride)
      r = _ws_conv(sub('conv1b'), _act(r))
      r = _ws_conv(sub('conv2'), _act(r))
      s = r.mean(axis=(1, 2))
      s = jax.nn.sigmoid(_dense(sub('squeeze_excite/~/linear_1'),
                                jnp.maximum(_dense(sub('squeeze_excite/~/linear'), s), 0.0)))
      r = 2.0 * s[:, None, None, :] * r
      x = r * p(prefix)['skip_gain'] * alpha + shortcut
      expected_var = (1.0 if i == 0 else expected_var) + alpha**2
      block += 1
  x = _act(_ws_conv(p('final_conv'), x))
  return _dense(p('linear'), x.mean(axis=(1, 2)))


def random_params(shapes, seed=0):
  """Reference-format params with non-trivial values for every leaf (not the init values)."""
  rng = np.random.default_rng(seed)
  params = {}
  for module, leaves in sorted(shapes.items()):
    params[module] = {}
    for name, shape in sorted(leaves.items()):
      if name == 'w' and len(shape) == 2:
        value = rng.normal(0.0, 1.0 / math.sqrt(shape[0]), shape)
      elif name == 'w':
        value = rng.normal(0.0, 1.0, shape)
      elif name in ('gain', 'skip_gain'):
        value = rng.uniform(0.5, 1.5, shape)
      else:  # 'bias', 'b'
        value = rng.normal(0.0, 0.2, shape)
      params[module][name] = np.asarray(value, np.float32)
  return params
