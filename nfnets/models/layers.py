"""Building blocks of normaliser-free networks.

Each block exists once here: the scaled weight-standardised convolution, the gamma-scaled
activations, squeeze-excite and stochastic depth. Model families (``nfnets.models.*``) only compose them.
"""
from typing import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.errors import ConfigError

# gamma = 1 / std(act(z)) for z ~ N(0, 1), so that a gamma-scaled activation keeps unit variance.
# The published constants were estimated from random samples, so they sit within ~0.1% of the
# exact values; they are kept as published because the reference checkpoints were trained with
# them. 'gelu_exact' (erf GELU, unpublished) uses the exact value from numerical quadrature.
_ACTIVATIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], float]] = {
    'gelu': (lambda x: jax.nn.gelu(x, approximate=True), 1.7015043497085571),
    'gelu_exact': (lambda x: jax.nn.gelu(x, approximate=False), 1.700926243363333),
    'relu': (jax.nn.relu, 1.7139588594436646),
    'silu': (jax.nn.silu, 1.7881293296813965),
    'elu': (jax.nn.elu, 1.2716004848480225),
    'tanh': (jnp.tanh, 1.5939117670059204),
}

GROUPED_CONV_MODES = ('auto', 'native', 'split')


def activation_names() -> tuple[str, ...]:
  """Names accepted by `get_activation`."""
  return tuple(_ACTIVATIONS)


def activation_gamma(name: str) -> float:
  """The variance-preserving gain applied after activation `name`."""
  return _lookup_activation(name)[1]


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the gamma-scaled activation `name` (e.g. 'gelu', 'relu')."""
  fn, gamma = _lookup_activation(name)

  def scaled(x: jax.Array) -> jax.Array:
    return fn(x) * jnp.asarray(gamma, x.dtype)

  scaled.__name__ = f'scaled_{name}'
  return scaled


def _lookup_activation(name: str):
  if name not in _ACTIVATIONS:
    raise ConfigError(f'Unknown activation {name!r}; known activations: {", ".join(_ACTIVATIONS)}.')
  return _ACTIVATIONS[name]


def resolve_grouped_conv(mode: str) -> str:
  """Maps 'auto' to 'split' on CPU (XLA CPU runs grouped convs slowly) and 'native' elsewhere.

  'native' runs every convolution as one `lax.conv_general_dilated` (grouped ones with
  `feature_group_count`); 'split' is the formulation that XLA's CPU backend runs fast, with the
  same parameters and the same sums: one conv per group, and 1x1 convs as matmuls.
  """
  if mode not in GROUPED_CONV_MODES:
    raise ConfigError(f'Unknown grouped_conv mode {mode!r}; use one of {GROUPED_CONV_MODES}.')
  if mode == 'auto':
    return 'split' if jax.default_backend() == 'cpu' else 'native'
  return mode


def standardize_weight(weight: jax.Array, gain: jax.Array, eps: float = 1e-4) -> jax.Array:
  """Scaled weight standardisation of an HWIO kernel, computed in float32.

  Per output channel: (W - mean) * gain / sqrt(max(var * fan_in, eps)), with mean and biased
  variance over (H, W, I) and fan_in = H * W * I.
  """
  shape = weight.shape
  # As a [fan_in, out] matrix: XLA CPU reduces over one leading axis several times faster than over
  # three (in the backward pass above all), and the statistics are the same.
  weight = weight.astype(jnp.float32).reshape(-1, shape[-1])
  gain = gain.astype(jnp.float32)
  mean = jnp.mean(weight, axis=0)
  var = jnp.var(weight, axis=0)
  fan_in = weight.shape[0]
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  return (weight * scale - mean * scale).reshape(shape)


class WSConv2D(hk.Module):
  """2D convolution with scaled weight standardisation (NHWC inputs, HWIO kernel).

  Parameters: 'w' [k, k, in/groups, out], 'gain' [out] (init 1), 'bias' [out] (init 0).
  The standardised kernel is computed in float32 from the float32 parameter even under a
  `hk.mixed_precision` policy (whose getter would otherwise hand this module a bf16 copy), then
  cast to the input's dtype.
  """

  def __init__(self,
               output_channels: int,
               kernel_shape: int | Sequence[int],
               stride: int = 1,
               feature_group_count: int = 1,
               grouped_conv: str = 'auto',
               name: str | None = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = (tuple(kernel_shape) if isinstance(kernel_shape, Sequence)
                         else (kernel_shape, kernel_shape))
    self.stride = stride
    self.feature_group_count = feature_group_count
    self.grouped_conv = resolve_grouped_conv(grouped_conv)
    if output_channels % feature_group_count:
      raise ValueError(f'output_channels={output_channels} is not divisible by '
                       f'feature_group_count={feature_group_count}.')

  def __call__(self, x: jax.Array) -> jax.Array:
    in_channels = x.shape[-1]
    groups = self.feature_group_count
    if in_channels % groups:
      raise ValueError(f'{in_channels} input channels are not divisible by {groups} groups.')
    w_shape = (*self.kernel_shape, in_channels // groups, self.output_channels)
    w_init = hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal')
    w = hk.get_parameter('w', w_shape, jnp.float32, init=w_init)
    gain = hk.get_parameter('gain', (self.output_channels,), jnp.float32, init=jnp.ones)
    bias = hk.get_parameter('bias', (self.output_channels,), jnp.float32, init=jnp.zeros)
    if hk.mixed_precision.current_policy() is not None:
      w, gain = self._master_copies(w, gain)
    kernel = standardize_weight(w, gain).astype(x.dtype)
    out = self._convolve(x, kernel)
    return out + bias.astype(out.dtype)

  def _master_copies(self, w, gain):
    """The un-cast parameters, bypassing the mixed-precision getter's cast to compute dtype."""
    own = hk.get_params().get(self.module_name)
    if own is None or 'w' not in own:
      return w, gain
    return own['w'], own['gain']

  def _convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    groups = self.feature_group_count
    conv = lambda lhs, rhs, g: jax.lax.conv_general_dilated(
        lhs, rhs, window_strides=(self.stride, self.stride), padding='SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=g)
    if self.grouped_conv == 'native':
      return conv(x, kernel, groups)
    if self.kernel_shape == (1, 1) and groups == 1:
      # A matmul over channels (a 1x1 'SAME' conv samples every stride-th pixel). XLA CPU runs the
      # matmul's backward pass, the weight gradient above all, several times faster than the conv's.
      if self.stride > 1:
        x = x[:, ::self.stride, ::self.stride]
      return jax.lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
    if groups == 1:
      return conv(x, kernel, 1)
    # One dense conv per group: same parameters and sums, but XLA CPU runs these far faster.
    xs = jnp.split(x, groups, axis=-1)
    ks = jnp.split(kernel, groups, axis=-1)
    return jnp.concatenate([conv(xg, kg, 1) for xg, kg in zip(xs, ks)], axis=-1)


class SqueezeExcite(hk.Module):
  """Squeeze-excite gate: mean over H, W -> linear -> relu -> linear -> sigmoid, shaped [N,1,1,C].

  The caller applies it as ``2 * gate * x`` (the factor 2 keeps the signal's scale at init).
  """

  def __init__(self, output_channels: int, se_ratio: float = 0.5, name: str | None = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.hidden_channels = max(1, int(output_channels * se_ratio))
    # Built here (not in __call__) so they are named 'squeeze_excite/~/linear', '.../~/linear_1'.
    self.fc_hidden = hk.Linear(self.hidden_channels, name='linear')
    self.fc_out = hk.Linear(self.output_channels, name='linear_1')

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2))
    h = self.fc_out(jax.nn.relu(self.fc_hidden(h)))
    return jax.nn.sigmoid(h)[:, None, None, :]


def stochastic_depth(x: jax.Array, drop_rate: float, is_training: bool) -> jax.Array:
  """Zeroes whole examples of a residual branch with probability `drop_rate` during training.

  The kept examples are not rescaled by 1/keep (as in the reference recipe).
  """
  if not is_training or drop_rate <= 0.0:
    return x
  keep_prob = 1.0 - drop_rate
  noise = jax.random.uniform(hk.next_rng_key(), (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * jnp.floor(keep_prob + noise).astype(x.dtype)
