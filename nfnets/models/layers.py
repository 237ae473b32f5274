"""Building blocks of normaliser-free networks (and of the normalised baselines they are compared with).

Each block exists once here: the scaled weight-standardised convolution (and the plain one the batch-normalised
baseline uses), the gamma-scaled activations, squeeze-excite, stochastic depth, the NF signal-propagation
schedule (`block_schedule`: each block's widths, stride, beta and stochastic-depth rate), the residual merge
(`nf_merge`) and the shortcut (`shortcut`), and the signal-propagation statistics. Model families
(``nfnets.models.*``) write only their block and their table, and compose these.
"""
import dataclasses
from typing import Any, Callable, Optional, Sequence

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

GROUPED_CONV_MODES = ('auto', 'native', 'split', 'shifted')
# On CPU, 'auto' splits convs of up to this many groups; more (narrow groups, e.g. NF-RegNets' 8 channels) would
# compile one conv each, so they run as 'shifted'.
MAX_SPLIT_GROUPS = 16


def activation_names() -> tuple[str, ...]:
  """Names accepted by `get_activation`."""
  return tuple(_ACTIVATIONS)


def activation_gamma(name: str) -> float:
  """The variance-preserving gain applied after activation `name`."""
  return _lookup_activation(name)[1]


def get_activation(name: str, scaled: bool = True) -> Callable[[jax.Array], jax.Array]:
  """Returns the gamma-scaled activation `name` (e.g. 'gelu', 'relu'); the plain one if not `scaled`.

  Normalised networks (whose normalisation layers restore the variance) use the plain activations.
  """
  fn, gamma = _lookup_activation(name)
  if not scaled:
    return fn

  def scaled(x: jax.Array) -> jax.Array:
    return fn(x) * jnp.asarray(gamma, x.dtype)

  scaled.__name__ = f'scaled_{name}'
  return scaled


def _lookup_activation(name: str):
  if name not in _ACTIVATIONS:
    raise ConfigError(f'Unknown activation {name!r}; known activations: {", ".join(_ACTIVATIONS)}.')
  return _ACTIVATIONS[name]


def resolve_grouped_conv(mode: str, groups: int = 1) -> str:
  """How a conv of `groups` groups runs: `mode`, with 'auto' resolved for the backend.

  'native': one `feature_group_count` conv, what accelerators want. XLA CPU runs those very slowly (a 3x3
  conv of 744 channels in 93 groups at 14x14, batch 8: 23 s forward and backward), so 'auto' picks on CPU
  'split', one dense conv per group (the fastest to run, 40 ms there, but each group compiles separately:
  15 s), for up to `MAX_SPLIT_GROUPS` groups, and beyond that 'shifted', one batched matmul over the groups
  per kernel tap (1 s to compile, 150 ms to run). All three compute the same function from the same kernel.
  Outside 'native', 1x1 convs without groups run as matmuls (see `convolve`).
  """
  if mode not in GROUPED_CONV_MODES:
    raise ConfigError(f'Unknown grouped_conv mode {mode!r}; use one of {GROUPED_CONV_MODES}.')
  if mode == 'auto':
    if jax.default_backend() != 'cpu':
      return 'native'
    return 'split' if groups <= MAX_SPLIT_GROUPS else 'shifted'
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


def convolve(x: jax.Array, kernel: jax.Array, stride: int, groups: int, grouped_conv: str) -> jax.Array:
  """NHWC x HWIO 'SAME' convolution, a grouped one executed as `grouped_conv` says (see `resolve_grouped_conv`)."""
  conv = lambda lhs, rhs, g: jax.lax.conv_general_dilated(
      lhs, rhs, window_strides=(stride, stride), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=g)
  mode = resolve_grouped_conv(grouped_conv, groups)
  if mode == 'native':
    return conv(x, kernel, groups)
  if kernel.shape[:2] == (1, 1) and groups == 1:
    # A matmul over channels (a 1x1 'SAME' conv samples every stride-th pixel). XLA CPU runs the
    # matmul's backward pass, the weight gradient above all, several times faster than the conv's.
    if stride > 1:
      x = x[:, ::stride, ::stride]
    return jax.lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
  if groups == 1:
    return conv(x, kernel, 1)
  if mode == 'shifted':
    return _shifted_grouped_conv(x, kernel, stride, groups)
  # One dense conv per group: same parameters and sums, but XLA CPU runs these far faster.
  xs = jnp.split(x, groups, axis=-1)
  ks = jnp.split(kernel, groups, axis=-1)
  return jnp.concatenate([conv(xg, kg, 1) for xg, kg in zip(xs, ks)], axis=-1)


def _shifted_grouped_conv(x: jax.Array, kernel: jax.Array, stride: int, groups: int) -> jax.Array:
  """A grouped 'SAME' conv as a sum over kernel taps of strided input slices times that tap's weights,
  each tap one matmul batched over the groups."""
  kh, kw, group_in, out_channels = kernel.shape
  n, h, w, channels = x.shape
  out_h, out_w = -(-h // stride), -(-w // stride)
  # TensorFlow's 'SAME' padding: the odd pixel, if any, goes after.
  pad_h, pad_w = max((out_h - 1) * stride + kh - h, 0), max((out_w - 1) * stride + kw - w, 0)
  x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  x = x.reshape(*x.shape[:3], groups, channels // groups)
  kernel = kernel.reshape(kh, kw, group_in, groups, out_channels // groups)
  out = None
  for dy in range(kh):
    for dx in range(kw):
      window = x[:, dy:dy + (out_h - 1) * stride + 1:stride, dx:dx + (out_w - 1) * stride + 1:stride]
      tap = jnp.einsum('nhwgi,igo->nhwgo', window, kernel[dy, dx])
      out = tap if out is None else out + tap
  return out.reshape(n, out_h, out_w, out_channels)


class Conv2D(hk.Module):
  """Plain 2D convolution without bias (NHWC inputs, HWIO kernel 'w'), for layers followed by a normaliser.

  `WSConv2D` extends it, so the two share initialisation and grouped-conv execution and differ only by the
  standardisation.
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
    self.grouped_conv = resolve_grouped_conv(grouped_conv, feature_group_count)
    if output_channels % feature_group_count:
      raise ValueError(f'output_channels={output_channels} is not divisible by '
                       f'feature_group_count={feature_group_count}.')

  def _weight(self, x: jax.Array) -> jax.Array:
    """The kernel parameter 'w' [k, k, in/groups, out] for input `x` (fan-in normal initialisation)."""
    groups = self.feature_group_count
    if x.shape[-1] % groups:
      raise ValueError(f'{x.shape[-1]} input channels are not divisible by {groups} groups.')
    w_shape = (*self.kernel_shape, x.shape[-1] // groups, self.output_channels)
    w_init = hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal')
    return hk.get_parameter('w', w_shape, jnp.float32, init=w_init)

  def _convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    return convolve(x, kernel, self.stride, self.feature_group_count, self.grouped_conv)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self._convolve(x, self._weight(x).astype(x.dtype))


class WSConv2D(Conv2D):
  """2D convolution with scaled weight standardisation (NHWC inputs, HWIO kernel).

  Parameters: 'w' [k, k, in/groups, out], 'gain' [out] (init 1), 'bias' [out] (init 0).
  The standardised kernel is computed in float32 from the float32 parameter even under a
  `hk.mixed_precision` policy (whose getter would otherwise hand this module a bf16 copy), then
  cast to the input's dtype.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self._weight(x)
    gain = hk.get_parameter('gain', (self.output_channels,), jnp.float32, init=jnp.ones)
    bias = hk.get_parameter('bias', (self.output_channels,), jnp.float32, init=jnp.zeros)
    if hk.mixed_precision.current_policy() is not None:
      w, gain = self._master_copies(w, gain)
    out = self._convolve(x, standardize_weight(w, gain).astype(x.dtype))
    return out + bias.astype(out.dtype)

  def _master_copies(self, w, gain):
    """The un-cast parameters, bypassing the mixed-precision getter's cast to compute dtype."""
    own = hk.get_params().get(self.module_name)
    if own is None or 'w' not in own:
      return w, gain
    return own['w'], own['gain']


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


# ---- The NF core: where each block sits in the signal-propagation bookkeeping, and how its output is formed. ----

@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """One residual block's place in a network, as `block_schedule` lays it out.

  Attributes:
    index: the block's position over all stages (0 for the network's first block).
    index_in_stage: its position in its stage (0 for the stage's first, transition block).
    in_channels, out_channels: the widths it reads and writes.
    stride: the stage's stride for its first block, 1 for the others (only a transition downsamples).
    beta: 1 / the expected standard deviation of its input; the block scales its pre-activated input by it so
      that its residual branch starts at unit variance.
    expected_var: the expected variance of its output: alpha² plus its input's, or plus 1 for a stage's first
      block (its projected shortcut starts afresh at unit variance).
    stochdepth_rate: its stochastic-depth drop rate, growing linearly from 0 at the first block.
  """
  index: int
  index_in_stage: int
  in_channels: int
  out_channels: int
  stride: int
  beta: float
  expected_var: float
  stochdepth_rate: float

  @property
  def has_projection(self) -> bool:
    """Whether the shortcut needs a 1x1 conv: the block changes width or resolution."""
    return self.stride > 1 or self.in_channels != self.out_channels


def block_schedule(in_channels: int, widths: Sequence[int], depths: Sequence[int], strides: Sequence[int], *,
                   alpha: float, stochdepth_rate: float) -> list[BlockPlan]:
  """The blocks of a network of stages (`depths[i]` blocks of width `widths[i]`, the first strided by
  `strides[i]`) reading an `in_channels`-wide stem, with the NF bookkeeping of their signal's variance.

  A block outputs `shortcut + alpha * residual`, its residual branch at unit variance (its input scaled by
  beta = 1/expected std); so the expected variance grows by alpha² per block. A stage's first block
  projects its shortcut from the beta-scaled input, which restarts the count at 1 (+ alpha²). Networks
  without the bookkeeping (the batch-normalised baseline) pass alpha=0: every beta is then 1.
  """
  plans = []
  num_blocks = sum(depths)
  expected_std = 1.0
  for width, depth, stage_stride in zip(widths, depths, strides):
    for index_in_stage in range(depth):
      index = len(plans)
      beta = 1.0 / expected_std
      if index_in_stage == 0:
        expected_std = 1.0
      # Kept as a standard deviation, updated as the reference does, so every beta is the same float.
      expected_std = (expected_std**2 + alpha**2)**0.5
      plans.append(BlockPlan(
          index=index, index_in_stage=index_in_stage, in_channels=in_channels, out_channels=width,
          stride=stage_stride if index_in_stage == 0 else 1, beta=beta, expected_var=expected_std**2,
          stochdepth_rate=stochdepth_rate * index / num_blocks))
      in_channels = width
  return plans


def shortcut(x: jax.Array, preactivated: jax.Array, projection: Optional[Callable[[jax.Array], jax.Array]],
             pool_stride: int = 1) -> jax.Array:
  """A block's shortcut: `x` itself, or (for a block that has a projection) the projection of its
  pre-activated input, after a 2x2 average pool when `pool_stride` is 2.

  The average-pool shortcut ('-D' ResNets: NFNets, NF-RegNets, the SE-ResNeXt-D baseline) pools and
  projects with a stride-1 conv; NF-ResNets pass pool_stride=1 and stride the projection itself.
  """
  if projection is None:
    return x
  if pool_stride > 1:
    window = (1, pool_stride, pool_stride, 1)
    preactivated = hk.avg_pool(preactivated, window_shape=window, strides=window, padding='SAME')
  return projection(preactivated)


def nf_merge(residual: jax.Array, shortcut_value: jax.Array, *, alpha: float, stochdepth_rate: float,
             is_training: bool) -> jax.Array:
  """An NF block's output: its residual branch through stochastic depth, times the calling module's
  zero-initialised scalar 'skip_gain' (so every block starts as the identity), times alpha, plus the shortcut.
  """
  out = stochastic_depth(residual, stochdepth_rate, is_training)
  skip_gain = hk.get_parameter('skip_gain', (), jnp.float32, init=jnp.zeros)
  out = out * skip_gain.astype(out.dtype)
  return out * jnp.asarray(alpha, out.dtype) + shortcut_value


def _channel_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(channel-averaged squared channel mean, channel-averaged channel variance) over N, H, W, in float32."""
  x = x.astype(jnp.float32)
  return jnp.mean(jnp.square(jnp.mean(x, axis=(0, 1, 2)))), jnp.mean(jnp.var(x, axis=(0, 1, 2)))


def signal_stats(output: jax.Array, residual: jax.Array) -> dict[str, jax.Array]:
  """One block's signal-propagation statistics, as the paper plots them (float32 scalars).

  'avg_sq_mean' and 'avg_var': the channel-averaged squared mean and variance of the block's output;
  'res_avg_var': the channel-averaged variance of its residual branch (before stochastic depth and skip gain).
  """
  avg_sq_mean, avg_var = _channel_stats(output)
  return dict(avg_sq_mean=avg_sq_mean, avg_var=avg_var, res_avg_var=_channel_stats(residual)[1])


# What a rematerialised block keeps for its backward pass besides its input: nothing (see `run_blocks`).
REMAT_POLICY = None


def run_blocks(blocks: Sequence[Callable[..., tuple[jax.Array, jax.Array]]], x: jax.Array, is_training: bool,
               return_metrics: bool, remat: bool = False) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
  """Applies residual blocks (each returning its output and its residual branch) in order; with
  `return_metrics`, also each block's `signal_stats` under its module name.

  With `remat`, each block is rematerialised (`hk.remat`): the backward pass keeps only the block's input
  and recomputes its activations, trading about one extra forward pass for activation memory that no longer
  grows with depth inside a block. `hk.remat` threads the block's parameters, Haiku state (batch statistics)
  and RNG keys (stochastic depth) through the recomputation, so outputs and gradients are unchanged. The
  statistics are computed inside the rematerialised function so that only scalars, not the residual
  branch, leave it.
  """
  signal = {}
  for block in blocks:
    def apply(h, block=block):
      out, residual = block(h, is_training)
      return out, (signal_stats(out, residual) if return_metrics else {})
    if remat:
      apply = hk.remat(apply, policy=REMAT_POLICY)
    x, stats = apply(x)
    if return_metrics:
      signal[block.module_name] = stats
  return x, signal


def pooled_classifier(features: jax.Array, linear: Callable[[jax.Array], jax.Array], *, drop_rate: float,
                      is_training: bool, signal: dict[str, Any], return_metrics: bool):
  """Global average pooling, dropout in training, then `linear`: the logits, or with `return_metrics` a dict
  of 'logits', 'pooled_features' (before dropout) and 'signal_propagation'."""
  pooled = jnp.mean(features, axis=(1, 2))
  head_input = pooled
  if is_training and drop_rate > 0:
    head_input = hk.dropout(hk.next_rng_key(), drop_rate, pooled)
  logits = linear(head_input)
  if return_metrics:
    return dict(logits=logits, pooled_features=pooled, signal_propagation=signal)
  return logits
