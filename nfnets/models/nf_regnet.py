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
import ml_collections

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
NUM_STAGES = 4
# The head widens like EfficientNet-B0's (440 -> 1280 channels), in proportion to the last stage.
HEAD_RATIO = (1280, 440)


class NFRegNetBlock(hk.Module):
  """Inverted bottleneck: act(x)*beta -> 1x1 expand -> 3x3 grouped (strided) -> SE -> 1x1 project.

  Output is ``residual * skip_gain * alpha + shortcut``; `__call__` returns (output, residual branch before
  stochastic depth and skip gain).
  """

  def __init__(self, in_channels: int, out_channels: int, *, expansion: float, group_width: int,
               stride: int = 1, beta: float = 1.0, alpha: float = 0.2, se_ratio: float = 0.5,
               stochdepth_rate: float = 0.0, activation: str = 'silu', grouped_conv: str = 'auto',
               name: str | None = None):
    super().__init__(name=name)
    self.stride = stride
    self.beta = beta
    self.alpha = alpha
    self.stochdepth_rate = stochdepth_rate
    self.activation = layers.get_activation(activation)
    # The expanded width is rounded down to whole groups.
    groups = max(1, int(in_channels * expansion) // group_width)
    width = groups * group_width
    self.conv0 = layers.WSConv2D(width, 1, name='conv0')
    self.conv1 = layers.WSConv2D(width, 3, stride=stride, feature_group_count=groups,
                                 grouped_conv=grouped_conv, name='conv1')
    self.squeeze_excite = layers.SqueezeExcite(width, se_ratio)
    self.conv2 = layers.WSConv2D(out_channels, 1, name='conv2')
    self.has_shortcut_conv = stride > 1 or in_channels != out_channels
    if self.has_shortcut_conv:
      self.conv_shortcut = layers.WSConv2D(out_channels, 1, name='conv_shortcut')

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.activation(x) * jnp.asarray(self.beta, x.dtype)
    if self.stride > 1:
      shortcut = hk.avg_pool(out, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding='SAME')
      shortcut = self.conv_shortcut(shortcut)
    elif self.has_shortcut_conv:
      shortcut = self.conv_shortcut(out)
    else:
      shortcut = x
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = 2 * self.squeeze_excite(out).astype(out.dtype) * out
    residual = self.conv2(self.activation(out))
    out = layers.stochastic_depth(residual, self.stochdepth_rate, is_training)
    skip_gain = hk.get_parameter('skip_gain', (), jnp.float32, init=jnp.zeros)
    out = out * skip_gain.astype(out.dtype)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, residual


class NFRegNet(hk.Module):
  """Normaliser-free RegNet (NF-RegNet-B0 ... B8).

  Call as ``model(images_nhwc, is_training)`` inside `hk.transform`; returns logits, or with
  ``return_metrics=True`` a dict with 'logits', 'pooled_features' and 'signal_propagation' (as NFNet's).

  `width` multiplies the table's stage widths (0.75, as published); `expansion` is the inverted bottleneck's
  ratio (the network's first block uses 1); `group_width` the channels per group of the 3x3 convs.
  `depths`/`widths` override the variant's (before `width`). `grouped_conv` as in `NFNet`.
  """

  def __init__(self, num_classes: int, variant: str = 'B0', width: float = 0.75, expansion: float = 2.25,
               group_width: int = 8, se_ratio: float = 0.5, alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: float = 0.0, activation: str = 'silu', depths: Sequence[int] | None = None,
               widths: Sequence[int] | None = None, grouped_conv: str = 'auto', remat: bool = False,
               name: str = 'NF_RegNet'):
    super().__init__(name=name)
    entry = models.get_variant('nf_regnet', variant)
    self.depths = tuple(depths if depths is not None else entry['depths'])
    self.widths = tuple(int(w * width) for w in (widths if widths is not None else entry['widths']))
    if len(self.depths) != NUM_STAGES or len(self.widths) != NUM_STAGES:
      raise ConfigError(f'depths and widths need {NUM_STAGES} stages, got {self.depths} and {self.widths}')
    self.drop_rate = drop_rate
    self.remat = remat
    self.activation = layers.get_activation(activation)
    channels = self.widths[0]
    self.initial_conv = layers.WSConv2D(channels, 3, stride=2, name='initial_conv')
    self.blocks = []
    num_blocks = sum(self.depths)
    expected_std = 1.0
    for stage_width, depth in zip(self.widths, self.depths):
      for index_in_stage in range(depth):
        self.blocks.append(NFRegNetBlock(
            channels, stage_width, expansion=1.0 if not self.blocks else expansion,
            group_width=group_width, stride=2 if index_in_stage == 0 else 1, beta=1.0 / expected_std,
            alpha=alpha, se_ratio=se_ratio, stochdepth_rate=stochdepth_rate * len(self.blocks) / num_blocks,
            activation=activation, grouped_conv=grouped_conv, name='nf_block'))
        channels = stage_width
        if index_in_stage == 0:
          expected_std = 1.0
        expected_std = (expected_std**2 + alpha**2)**0.5
    self.final_conv = layers.WSConv2D(HEAD_RATIO[0] * channels // HEAD_RATIO[1], 1, name='final_conv')
    self.linear = hk.Linear(num_classes, w_init=jnp.zeros, name='linear')

  def __call__(self, x: jax.Array, is_training: bool, return_metrics: bool = False):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'NFRegNet expects NHWC RGB images, got shape {x.shape}.')
    x = self.initial_conv(x)
    x, signal = layers.run_blocks(self.blocks, x, is_training, return_metrics, self.remat)
    x = self.activation(self.final_conv(x))
    return layers.pooled_classifier(x, self.linear, drop_rate=self.drop_rate, is_training=is_training,
                                    signal=signal, return_metrics=return_metrics)


def default_model_config(variant: str = 'B0') -> ml_collections.ConfigDict:
  """`config.model` for NF-RegNet `variant`: the module's arguments (the configs add the recipe's dropout)."""
  return ml_collections.ConfigDict(dict(
      name='nf_regnet',
      variant=variant,
      num_classes=1000,
      width=0.75,
      expansion=2.25,
      group_width=8,
      se_ratio=0.5,
      alpha=0.2,
      stochdepth_rate=0.1,
      drop_rate=0.0,
      activation='silu',
      grouped_conv='auto',
      remat=False,                # recompute each block's activations in the backward pass
      depths=ml_collections.config_dict.placeholder(tuple),
      widths=ml_collections.config_dict.placeholder(tuple),
  ))


models.register(models.ModelFamily(
    name='nf_regnet',
    module=NFRegNet,
    variants=VARIANTS,
    default_model_config=default_model_config,
    classifier_module='NF_RegNet/~/linear',
    training_only_keys=('drop_rate', 'stochdepth_rate', 'grouped_conv', 'remat'),
))
