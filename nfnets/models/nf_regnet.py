"""NF-RegNets (Brock, De, Smith 2021, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets"): normaliser-free RegNet-style networks of inverted bottlenecks, scaled across B0-B8 the
EfficientNet way (wider, deeper and at higher resolution together), as in the reference release's
`nf_regnet.py`.

Module names (``i`` counts blocks over all stages, ``nf_block`` being block 0)::

  NF_RegNet/~/initial_conv                             3x3/2 WSConv2D to the first stage's width
  NF_RegNet/~/nf_block_i                               skip_gain
  NF_RegNet/~/nf_block_i/~/conv0                       1x1 WSConv2D, expands to in_ch * expansion (whole groups)
  NF_RegNet/~/nf_block_i/~/conv1                       3x3 grouped WSConv2D (group width 8), carries the stride
  NF_RegNet/~/nf_block_i/~/squeeze_excite/~/linear(_1) squeeze-excite on the expanded width
  NF_RegNet/~/nf_block_i/~/conv2                       1x1 WSConv2D, out_ch
  NF_RegNet/~/nf_block_i/~/conv_shortcut               1x1 WSConv2D after a 2x2 average pool (first block of a stage)
  NF_RegNet/~/final_conv                               1x1 WSConv2D to 1280/440 of the last width
  NF_RegNet/~/linear                                   classifier (zero-initialised)

Every stage starts with a strided block, so with the strided stem the network downsamples by 32.
"""
from typing import Any, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import models
from nfnets.errors import ConfigError
from nfnets.models import layers

# B0..B8: stage widths (before the `width` multiplier, 0.75 by default) and blocks per stage. Resolutions and
# dropout rates grow with them; they are recipe numbers, in configs/nf_regnet.py.
VARIANTS: dict[str, dict[str, Any]] = {
    'B0': dict(widths=(48, 104, 208, 440), depths=(1, 3, 6, 6)),
    'B1': dict(widths=(48, 104, 208, 440), depths=(2, 4, 7, 7)),
    'B2': dict(widths=(56, 112, 232, 488), depths=(2, 4, 8, 8)),
    'B3': dict(widths=(56, 128, 248, 528), depths=(2, 5, 9, 9)),
    'B4': dict(widths=(64, 144, 288, 616), depths=(2, 6, 11, 11)),
    'B5': dict(widths=(80, 168, 336, 704), depths=(3, 7, 14, 14)),
    'B6': dict(widths=(88, 184, 376, 792), depths=(3, 8, 16, 16)),
    'B7': dict(widths=(96, 208, 416, 880), depths=(4, 10, 19, 19)),
    'B8': dict(widths=(104, 232, 456, 968), depths=(4, 11, 22, 22)),
}
# Every stage starts with a strided block.
STRIDES = (2, 2, 2, 2)
# The head widens like EfficientNet-B0's (440 -> 1280 channels), in proportion to the last stage.
HEAD_RATIO = (1280, 440)


class NFRegNetBlock(hk.Module):
  """Inverted bottleneck: act(x)*beta -> 1x1 expand -> 3x3 grouped (strided) -> SE -> 1x1 project.

  Output is ``residual * skip_gain * alpha + shortcut`` (`layers.nf_merge`), the shortcut average-pooled;
  `__call__` returns (output, residual branch before stochastic depth and skip gain).
  """

  def __init__(self, plan: layers.BlockPlan, *, expansion: float, group_width: int, alpha: float,
               se_ratio: float, activation: str, grouped_conv: str, name: str | None = None):
    super().__init__(name=name)
    self.plan = plan
    self.alpha = alpha
    self.activation = layers.get_activation(activation)
    # The expanded width is rounded down to whole groups.
    groups = max(1, int(plan.in_channels * expansion) // group_width)
    width = groups * group_width
    self.conv0 = layers.WSConv2D(width, 1, name='conv0')
    self.conv1 = layers.WSConv2D(width, 3, stride=plan.stride, feature_group_count=groups,
                                 grouped_conv=grouped_conv, name='conv1')
    self.squeeze_excite = layers.SqueezeExcite(width, se_ratio)
    self.conv2 = layers.WSConv2D(plan.out_channels, 1, name='conv2')
    self.conv_shortcut = (layers.WSConv2D(plan.out_channels, 1, name='conv_shortcut')
                          if plan.has_projection else None)

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.activation(x) * jnp.asarray(self.plan.beta, x.dtype)
    shortcut = layers.shortcut(x, out, self.conv_shortcut, pool_stride=self.plan.stride)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = 2 * self.squeeze_excite(out).astype(out.dtype) * out
    residual = self.conv2(self.activation(out))
    out = layers.nf_merge(residual, shortcut, alpha=self.alpha, stochdepth_rate=self.plan.stochdepth_rate,
                          is_training=is_training)
    return out, residual


class NFRegNet(hk.Module):
  """Normaliser-free RegNet (NF-RegNet-B0 ... B8).

  Call as ``model(images_nhwc, is_training)`` inside `hk.transform`; returns logits, or with
  ``return_metrics=True`` a dict with 'logits', 'pooled_features' and 'signal_propagation' (as NFNet's).

  `width` multiplies the table's stage widths (0.75, as published); `expansion` is the inverted bottleneck's
  ratio (the network's first block uses 1); `group_width` the channels per group of the 3x3 convs.
  `depths`/`widths` override the variant's (before `width`). `grouped_conv` and `remat` as in `NFNet`. These
  defaults are also the config's (`default_model_config`).
  """

  def __init__(self, num_classes: int = 1000, variant: str = 'B0', width: float = 0.75, expansion: float = 2.25,
               group_width: int = 8, se_ratio: float = 0.5, alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: float = 0.0, activation: str = 'silu', depths: Sequence[int] | None = None,
               widths: Sequence[int] | None = None, grouped_conv: str = 'auto', remat: bool = False,
               name: str = 'NF_RegNet'):
    super().__init__(name=name)
    entry = models.get_variant('nf_regnet', variant)
    self.depths = tuple(depths if depths is not None else entry['depths'])
    self.widths = tuple(int(w * width) for w in (widths if widths is not None else entry['widths']))
    if len(self.depths) != len(STRIDES) or len(self.widths) != len(STRIDES):
      raise ConfigError(f'depths and widths need {len(STRIDES)} stages, got {self.depths} and {self.widths}')
    self.drop_rate = drop_rate
    self.remat = remat
    self.activation = layers.get_activation(activation)
    channels = self.widths[0]
    self.initial_conv = layers.WSConv2D(channels, 3, stride=2, name='initial_conv')
    plans = layers.block_schedule(channels, self.widths, self.depths, STRIDES, alpha=alpha,
                                  stochdepth_rate=stochdepth_rate)
    # The network's first block does not expand (its input is the stem's, as wide as the first stage).
    self.blocks = [NFRegNetBlock(plan, expansion=1.0 if plan.index == 0 else expansion, group_width=group_width,
                                 alpha=alpha, se_ratio=se_ratio, activation=activation, grouped_conv=grouped_conv,
                                 name='nf_block') for plan in plans]
    self.final_conv = layers.WSConv2D(HEAD_RATIO[0] * plans[-1].out_channels // HEAD_RATIO[1], 1,
                                      name='final_conv')
    self.linear = hk.Linear(num_classes, w_init=jnp.zeros, name='linear')

  def __call__(self, x: jax.Array, is_training: bool, return_metrics: bool = False):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'NFRegNet expects NHWC RGB images, got shape {x.shape}.')
    x = self.initial_conv(x)
    x, signal = layers.run_blocks(self.blocks, x, is_training, return_metrics, self.remat)
    x = self.activation(self.final_conv(x))
    return layers.pooled_classifier(x, self.linear, drop_rate=self.drop_rate, is_training=is_training,
                                    signal=signal, return_metrics=return_metrics)


default_model_config = models.signature_config('nf_regnet', NFRegNet)


models.register(models.ModelFamily(
    name='nf_regnet',
    module=NFRegNet,
    variants=VARIANTS,
    default_model_config=default_model_config,
    classifier_module='NF_RegNet/~/linear',
    training_only_keys=('drop_rate', 'stochdepth_rate', 'grouped_conv', 'remat'),
))
