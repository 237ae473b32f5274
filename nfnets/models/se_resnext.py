"""The batch-normalised baseline: NFNet-F0..F7's topology (SE-ResNeXt-D-style) with batch normalisation.

Same stem, stage widths and depths (NFNet's `VARIANTS`, imported), grouped 3x3 convs, squeeze-excite,
average-pool shortcuts, head and regularisers as `nfnets.models.nfnet.NFNet`; what differs is only what
normalisation replaces: plain convolutions (no weight standardisation, no bias) with batch normalisation
before every activation (pre-activation, as the NF networks' beta scaling sits before theirs), plain
activations (no gamma), no alpha/beta signal bookkeeping, no skip gains, and an ungained squeeze-excite
(``se * out``, not ``2 * se * out``).

Batch statistics. In training the statistics are averaged over the devices (`cross_replica_axis`, the train
step's pmap axis 'batch'): every device normalises with the global batch's mean and variance, so the moving
averages (decay `bn_decay`) are identical on every device. Outside a pmap over that axis (initialisation under
jit, a single-device forward) the local batch's statistics are used. Evaluation (`is_training=False`) uses the
moving averages. The normalisation computes in float32 under a bfloat16 policy (`models.make_forward` gives
`BatchNorm` a float32 policy), and its moving averages are float32 model state, checkpointed with the weights
(with `hk.BatchNorm`'s int32 update counters, which the train step carries as they are).

EMA of the statistics. The train step keeps an EMA of the model state beside the EMA of the weights, so the
EMA weights are evaluated with EMA statistics: the moving averages (a ~10-step average of batch statistics)
averaged over the same long horizon as the weights they are paired with. That is a second average, but not a
double count: pairing the EMA weights with the raw model's current statistics would normalise them with the
statistics of different weights. (The reference release did the same; recomputing the statistics for the EMA
weights would need an extra pass over the data.)

Module names (``i`` counts blocks over all stages)::

  SEResNeXtD/~/stem_conv0..3, stem_bn0..2          Conv2D w; BatchNorm scale, offset (+ state)
  SEResNeXtD/~/block_i/~/bn0..bn3, conv0, conv1, conv1b, conv2, conv_shortcut, squeeze_excite
  SEResNeXtD/~/final_conv, final_bn, linear
"""
from typing import Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import distributed
from nfnets import models
from nfnets.errors import ConfigError
from nfnets.models import layers
from nfnets.models import nfnet

VARIANTS = nfnet.VARIANTS


class BatchNorm(hk.Module):
  """Batch normalisation over N, H, W with per-channel `scale` and `offset` ([C] vectors).

  Wraps `hk.BatchNorm` (moving averages in its state, under '<name>/batch_norm/~/{mean,var}_ema'), giving it
  vector parameters: the optimiser's rules treat every vector as a gain or bias (no weight decay), while
  `hk.BatchNorm`'s own parameters would be [1, 1, 1, C].
  """

  def __init__(self, decay_rate: float, cross_replica_axis: Optional[str], name: Optional[str] = None):
    super().__init__(name=name)
    self.decay_rate = decay_rate
    self.cross_replica_axis = cross_replica_axis or None

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    channels = x.shape[-1]
    scale = hk.get_parameter('scale', (channels,), jnp.float32, init=jnp.ones)
    offset = hk.get_parameter('offset', (channels,), jnp.float32, init=jnp.zeros)
    axis = self.cross_replica_axis
    if not (is_training and axis is not None and distributed.axis_is_bound(axis)):
      axis = None
    norm = hk.BatchNorm(create_scale=False, create_offset=False, decay_rate=self.decay_rate,
                        cross_replica_axis=axis, name='batch_norm')
    return norm(x, is_training, scale=scale.astype(x.dtype), offset=offset.astype(x.dtype))


class SEResNeXtDBlock(hk.Module):
  """Pre-activation block: act(bn0(x)) -> 1x1 -> bn,act -> 3x3 grouped (strided) -> bn,act -> 3x3 grouped
  -> bn,act -> 1x1 -> SE; output ``residual + shortcut``, the shortcut average-pooled. `__call__` returns
  (output, residual branch before stochastic depth)."""

  def __init__(self, plan: layers.BlockPlan, *, se_ratio: float, group_width: int, activation: str,
               grouped_conv: str, bn_decay: float, cross_replica_axis: Optional[str], name: Optional[str] = None):
    super().__init__(name=name)
    self.plan = plan
    self.activation = layers.get_activation(activation, scaled=False)
    width, groups = nfnet.bottleneck_width(plan.out_channels, group_width)
    conv = lambda ch, k, name, stride=1, groups=1: layers.Conv2D(
        ch, k, stride=stride, feature_group_count=groups, grouped_conv=grouped_conv, name=name)
    self.norms = [BatchNorm(bn_decay, cross_replica_axis, name=f'bn{i}') for i in range(4)]
    self.conv0 = conv(width, 1, 'conv0')
    self.conv1 = conv(width, 3, 'conv1', stride=plan.stride, groups=groups)
    self.conv1b = conv(width, 3, 'conv1b', groups=groups)
    self.conv2 = conv(plan.out_channels, 1, 'conv2')
    self.conv_shortcut = conv(plan.out_channels, 1, 'conv_shortcut') if plan.has_projection else None
    self.squeeze_excite = layers.SqueezeExcite(plan.out_channels, se_ratio)

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    norm_act = lambda i, h: self.activation(self.norms[i](h, is_training))
    out = norm_act(0, x)
    shortcut = layers.shortcut(x, out, self.conv_shortcut, pool_stride=self.plan.stride)
    out = self.conv0(out)
    out = self.conv1(norm_act(1, out))
    out = self.conv1b(norm_act(2, out))
    out = self.conv2(norm_act(3, out))
    residual = self.squeeze_excite(out).astype(out.dtype) * out
    return layers.stochastic_depth(residual, self.plan.stochdepth_rate, is_training) + shortcut, residual


class SEResNeXtD(hk.Module):
  """Batch-normalised SE-ResNeXt-D with NFNet-F0..F7's (and F0+..F7+'s) widths and depths.

  Call as ``model(images_nhwc, is_training)`` inside `hk.transform_with_state`; returns logits, or with
  ``return_metrics=True`` a dict with 'logits', 'pooled_features' and 'signal_propagation' (as NFNet's).
  Arguments as `NFNet`'s where they mean the same; `bn_decay` is the moving averages' decay and
  `cross_replica_axis` the pmap axis the training statistics are averaged over ('' or None: per device).
  These defaults are also the config's (`default_model_config`).
  """

  def __init__(self, num_classes: int = 1000, variant: str = 'F0', width: float = 1.0, se_ratio: float = 0.5,
               stochdepth_rate: float = 0.25, drop_rate: float = 0.0, activation: str = 'gelu',
               depths: Sequence[int] | None = None, widths: Sequence[int] | None = None,
               group_width: int = 128, grouped_conv: str = 'auto', bn_decay: float = 0.9,
               cross_replica_axis: Optional[str] = distributed.AXIS_NAME, remat: bool = False,
               name: str = 'SEResNeXtD'):
    super().__init__(name=name)
    entry = models.get_variant('se_resnext', variant)
    self.depths = tuple(depths if depths is not None else entry['depths'])
    self.widths = tuple(int(w * width) for w in (widths if widths is not None else entry['widths']))
    if len(self.depths) != len(nfnet.STRIDES) or len(self.widths) != len(nfnet.STRIDES):
      raise ConfigError(f'depths and widths need {len(nfnet.STRIDES)} stages, got {self.depths} and '
                        f'{self.widths}')
    self.drop_rate = drop_rate
    self.remat = remat
    self.activation = layers.get_activation(activation, scaled=False)
    norm = lambda name: BatchNorm(bn_decay, cross_replica_axis, name=name)
    stem_widths = (*nfnet.STEM_WIDTHS, self.widths[0] // 2)
    self.stem = [layers.Conv2D(ch, 3, stride=stride, name=f'stem_conv{i}')
                 for i, (ch, stride) in enumerate(zip(stem_widths, nfnet.STEM_STRIDES))]
    self.stem_norms = [norm(f'stem_bn{i}') for i in range(len(self.stem) - 1)]
    # NFNet's schedule of widths, strides and stochastic-depth rates; no alpha: normalisation keeps the variance.
    plans = layers.block_schedule(stem_widths[-1], self.widths, self.depths, nfnet.STRIDES, alpha=0.0,
                                  stochdepth_rate=stochdepth_rate)
    self.blocks = [SEResNeXtDBlock(plan, se_ratio=se_ratio, group_width=group_width, activation=activation,
                                   grouped_conv=grouped_conv, bn_decay=bn_decay,
                                   cross_replica_axis=cross_replica_axis, name='block') for plan in plans]
    self.final_conv = layers.Conv2D(2 * plans[-1].out_channels, 1, name='final_conv')
    self.final_norm = norm('final_bn')
    self.linear = hk.Linear(num_classes, w_init=hk.initializers.RandomNormal(0.01), name='linear')

  def __call__(self, x: jax.Array, is_training: bool, return_metrics: bool = False):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'SEResNeXtD expects NHWC RGB images, got shape {x.shape}.')
    for conv, norm in zip(self.stem[:-1], self.stem_norms):
      x = self.activation(norm(conv(x), is_training))
    x = self.stem[-1](x)
    x, signal = layers.run_blocks(self.blocks, x, is_training, return_metrics, self.remat)
    x = self.activation(self.final_norm(self.final_conv(x), is_training))
    return layers.pooled_classifier(x, self.linear, drop_rate=self.drop_rate, is_training=is_training,
                                    signal=signal, return_metrics=return_metrics)


default_model_config = models.signature_config('se_resnext', SEResNeXtD)


models.register(models.ModelFamily(
    name='se_resnext',
    module=SEResNeXtD,
    variants=VARIANTS,
    default_model_config=default_model_config,
    classifier_module='SEResNeXtD/~/linear',
    training_only_keys=('drop_rate', 'stochdepth_rate', 'grouped_conv', 'bn_decay', 'cross_replica_axis',
                        'remat'),
    float32_modules=(BatchNorm,),
))
