"""NF-ResNets (Brock, De, Smith 2021, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets"): pre-activation bottleneck ResNets with scaled weight standardisation instead of batch
normalisation, as in the reference release's `nf_resnet.py`.

Module names (``i`` counts blocks over all stages, ``nf_res_block`` being block 0)::

  NF_ResNet/~/initial_conv                             7x7/2 WSConv2D to a quarter of the first stage's width
  NF_ResNet/~/nf_res_block_i                           skip_gain
  NF_ResNet/~/nf_res_block_i/~/conv0                   1x1 WSConv2D, out_ch/4
  NF_ResNet/~/nf_res_block_i/~/conv1                   3x3 WSConv2D, carries the stride
  NF_ResNet/~/nf_res_block_i/~/conv2                   1x1 WSConv2D, out_ch
  NF_ResNet/~/nf_res_block_i/~/conv_shortcut           1x1 WSConv2D with the stride (first block of a stage)
  NF_ResNet/~/nf_res_block_i/~/squeeze_excite/~/...    only with use_se
  NF_ResNet/~/linear                                   classifier

The reference's `width=4` (stage widths 64·width) is our `width=1.0` (stage widths 256, 512, 1024, 2048).
"""
from typing import Any, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import models
from nfnets.errors import ConfigError
from nfnets.models import layers

WIDTHS = (256, 512, 1024, 2048)
STRIDES = (1, 2, 2, 2)
BOTTLENECK_RATIO = 0.25

# Blocks per stage. ResNet26 is the usual 26-layer bottleneck ResNet (not in the reference's table).
VARIANTS: dict[str, dict[str, Any]] = {
    'ResNet26': dict(depths=(2, 2, 2, 2)),
    'ResNet50': dict(depths=(3, 4, 6, 3)),
    'ResNet101': dict(depths=(3, 4, 23, 3)),
    'ResNet152': dict(depths=(3, 8, 36, 3)),
    'ResNet200': dict(depths=(3, 24, 36, 3)),
    'ResNet288': dict(depths=(24, 24, 24, 24)),
    'ResNet600': dict(depths=(50, 50, 50, 50)),
}


class NFResBlock(hk.Module):
  """Pre-activation NF bottleneck: act(x)*beta -> 1x1 -> 3x3 (strided) -> 1x1 [-> SE].

  Output is ``residual * skip_gain * alpha + shortcut`` (`layers.nf_merge`), the shortcut being a strided 1x1
  conv of act(x)*beta when the block changes width or resolution, else x. `__call__` returns (output, residual
  branch before stochastic depth and skip gain).
  """

  def __init__(self, plan: layers.BlockPlan, *, alpha: float, activation: str, use_se: bool, se_ratio: float,
               name: str | None = None):
    super().__init__(name=name)
    self.plan = plan
    self.alpha = alpha
    self.activation = layers.get_activation(activation)
    width = int(plan.out_channels * BOTTLENECK_RATIO)
    self.conv0 = layers.WSConv2D(width, 1, name='conv0')
    self.conv1 = layers.WSConv2D(width, 3, stride=plan.stride, name='conv1')
    self.conv2 = layers.WSConv2D(plan.out_channels, 1, name='conv2')
    self.conv_shortcut = (layers.WSConv2D(plan.out_channels, 1, stride=plan.stride, name='conv_shortcut')
                          if plan.has_projection else None)
    self.squeeze_excite = layers.SqueezeExcite(plan.out_channels, se_ratio) if use_se else None

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.activation(x) * jnp.asarray(self.plan.beta, x.dtype)
    shortcut = layers.shortcut(x, out, self.conv_shortcut)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv2(self.activation(out))
    if self.squeeze_excite is not None:
      out = 2 * self.squeeze_excite(out).astype(out.dtype) * out
    residual = out
    out = layers.nf_merge(residual, shortcut, alpha=self.alpha, stochdepth_rate=self.plan.stochdepth_rate,
                          is_training=is_training)
    return out, residual


class NFResNet(hk.Module):
  """Normaliser-free pre-activation ResNet (NF-ResNet-26 ... -600).

  Call as ``model(images_nhwc, is_training)`` inside `hk.transform`; returns logits, or with
  ``return_metrics=True`` a dict with 'logits', 'pooled_features' and 'signal_propagation' (as NFNet's).

  `width` multiplies the stage widths (256, 512, 1024, 2048); `depths`/`widths` override the variant's
  (the stem is a quarter of the first stage's width). `drop_rate` is the head's dropout. `remat` recomputes each
  block's activations in the backward pass. These defaults are also the config's (`default_model_config`).
  """

  def __init__(self, num_classes: int = 1000, variant: str = 'ResNet50', width: float = 1.0, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: float = 0.0, activation: str = 'relu',
               use_se: bool = False, se_ratio: float = 0.25, depths: Sequence[int] | None = None,
               widths: Sequence[int] | None = None, remat: bool = False, name: str = 'NF_ResNet'):
    super().__init__(name=name)
    entry = models.get_variant('nf_resnet', variant)
    self.depths = tuple(depths if depths is not None else entry['depths'])
    self.widths = tuple(int(w * width) for w in (widths if widths is not None else WIDTHS))
    if len(self.depths) != len(STRIDES) or len(self.widths) != len(STRIDES):
      raise ConfigError(f'depths and widths need {len(STRIDES)} stages, got {self.depths} and {self.widths}')
    self.drop_rate = drop_rate
    self.remat = remat
    self.activation = layers.get_activation(activation)
    channels = self.widths[0] // 4
    self.initial_conv = layers.WSConv2D(channels, 7, stride=2, name='initial_conv')
    plans = layers.block_schedule(channels, self.widths, self.depths, STRIDES, alpha=alpha,
                                  stochdepth_rate=stochdepth_rate)
    self.blocks = [NFResBlock(plan, alpha=alpha, activation=activation, use_se=use_se, se_ratio=se_ratio)
                   for plan in plans]
    self.linear = hk.Linear(num_classes, w_init=hk.initializers.RandomNormal(0.01), name='linear')

  def __call__(self, x: jax.Array, is_training: bool, return_metrics: bool = False):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'NFResNet expects NHWC RGB images, got shape {x.shape}.')
    x = self.initial_conv(x)
    x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
    x, signal = layers.run_blocks(self.blocks, x, is_training, return_metrics, self.remat)
    return layers.pooled_classifier(self.activation(x), self.linear, drop_rate=self.drop_rate,
                                    is_training=is_training, signal=signal, return_metrics=return_metrics)


default_model_config = models.signature_config('nf_resnet', NFResNet)


models.register(models.ModelFamily(
    name='nf_resnet',
    module=NFResNet,
    variants=VARIANTS,
    default_model_config=default_model_config,
    classifier_module='NF_ResNet/~/linear',
    training_only_keys=('drop_rate', 'stochdepth_rate', 'remat'),
))
