"""NFNet models (Brock et al. 2021) with parameter names matching the public reference checkpoints.

Module names of a model built with the default name (``i`` counts blocks over all stages,
``nf_block`` being block 0, then ``nf_block_1``, ...)::

  NFNet/~/stem_conv0 .. NFNet/~/stem_conv3        WSConv2D: w, gain, bias
  NFNet/~/nf_block_i                              skip_gain
  NFNet/~/nf_block_i/~/conv0                      1x1 WSConv2D, out_ch/2
  NFNet/~/nf_block_i/~/conv1                      3x3 grouped WSConv2D, carries the stride
  NFNet/~/nf_block_i/~/conv1b                     3x3 grouped WSConv2D
  NFNet/~/nf_block_i/~/conv2                      1x1 WSConv2D, out_ch
  NFNet/~/nf_block_i/~/conv_shortcut              1x1 WSConv2D (first block of each stage only)
  NFNet/~/nf_block_i/~/squeeze_excite/~/linear    Linear: w, b (out_ch -> out_ch*se_ratio)
  NFNet/~/nf_block_i/~/squeeze_excite/~/linear_1  Linear: w, b (-> out_ch)
  NFNet/~/final_conv                              1x1 WSConv2D to 2x the last stage width
  NFNet/~/linear                                  classifier: w, b
"""
import re
from typing import Any, Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import models

from nfnets.errors import CheckpointError
from nfnets.errors import ConfigError
from nfnets.models import layers

WIDTHS = (256, 512, 1536, 1536)
WIDE_WIDTHS = (384, 768, 2048, 2048)
STRIDES = (1, 2, 2, 2)
# The stem: four 3x3 convs, to these widths and then to half the first stage's width, with these strides.
STEM_WIDTHS = (16, 32, 64)
STEM_STRIDES = (2, 1, 1, 2)

# The architecture table: F1..F7 multiply F0's stage depths; the wide '+' variants widen the stages.
# Recipe numbers (resolutions, RandAugment, dropout) are the configs' (configs/nfnet.py), not the model's.
VARIANTS: dict[str, dict[str, Any]] = {
    f'F{i}': dict(depths=tuple(d * (i + 1) for d in (1, 2, 6, 3)), widths=WIDTHS) for i in range(8)}
VARIANTS.update({f'{name}+': dict(entry, widths=WIDE_WIDTHS) for name, entry in list(VARIANTS.items())})


def bottleneck_width(out_channels: int, group_width: int) -> tuple[int, int]:
  """(width, groups) of a block's grouped 3x3 convs: half the output width, in whole groups of `group_width`.

  A bottleneck narrower than one group is one group.
  """
  width = int(out_channels * 0.5)
  groups = max(1, width // group_width)
  if width >= group_width:
    width = groups * group_width
  return width, groups


class NFBlock(hk.Module):
  """NF block: act(x)*beta -> 1x1 -> 3x3 (grouped, strided) -> 3x3 (grouped) -> 1x1 -> SE.

  Output is ``residual * skip_gain * alpha + shortcut`` (`layers.nf_merge`), the shortcut average-pooled;
  `__call__` returns (output, residual branch before stochastic depth and skip gain).
  """

  def __init__(self, plan: layers.BlockPlan, *, alpha: float, se_ratio: float, group_width: int,
               activation: str, grouped_conv: str, name: str | None = None):
    super().__init__(name=name)
    self.plan = plan
    self.alpha = alpha
    self.activation = layers.get_activation(activation)
    width, groups = bottleneck_width(plan.out_channels, group_width)
    conv = lambda ch, k, name, stride=1, groups=1: layers.WSConv2D(
        ch, k, stride=stride, feature_group_count=groups, grouped_conv=grouped_conv, name=name)
    self.conv0 = conv(width, 1, 'conv0')
    self.conv1 = conv(width, 3, 'conv1', stride=plan.stride, groups=groups)
    self.conv1b = conv(width, 3, 'conv1b', groups=groups)
    self.conv2 = conv(plan.out_channels, 1, 'conv2')
    self.conv_shortcut = conv(plan.out_channels, 1, 'conv_shortcut') if plan.has_projection else None
    self.squeeze_excite = layers.SqueezeExcite(plan.out_channels, se_ratio)

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.activation(x) * jnp.asarray(self.plan.beta, x.dtype)
    shortcut = layers.shortcut(x, out, self.conv_shortcut, pool_stride=self.plan.stride)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv1b(self.activation(out))
    out = self.conv2(self.activation(out))
    residual = 2 * self.squeeze_excite(out).astype(out.dtype) * out
    out = layers.nf_merge(residual, shortcut, alpha=self.alpha, stochdepth_rate=self.plan.stochdepth_rate,
                          is_training=is_training)
    return out, residual


class NFNet(hk.Module):
  """Normaliser-free ResNet (NFNet-F0..F7, wide 'F0+'..'F7+').

  Call as ``model(images_nhwc, is_training)`` inside `hk.transform`; returns logits, or with
  ``return_metrics=True`` a dict with 'logits', 'pooled_features' and 'signal_propagation'
  ({block module name: {'avg_sq_mean', 'avg_var', 'res_avg_var'}}, float32 scalars of the
  block output's channel statistics and of the residual branch's variance).

  `width` multiplies the stage widths; `depths`/`widths` override the variant's; `stem_width` sets the stem's
  output width (default: half the first stage's width, as in every published variant; timm's NFNets keep a
  128-wide stem whatever their widths). `drop_rate` is the head's dropout (the paper's per-variant rates are in
  configs/nfnet.py). `grouped_conv` picks how grouped 3x3 convs run: 'native' (one grouped conv), 'split' (one
  conv per group, same parameters and results; much faster on XLA CPU) or 'auto' (split on CPU only). `remat`
  recomputes each block's activations in the backward pass (`layers.run_blocks`). These defaults are also the
  config's (`default_model_config`).
  """

  def __init__(self, num_classes: int = 1000, variant: str = 'F0', width: float = 1.0,
               alpha: float = 0.2, se_ratio: float = 0.5, stochdepth_rate: float = 0.25,
               drop_rate: float = 0.0, activation: str = 'gelu',
               depths: Sequence[int] | None = None, widths: Sequence[int] | None = None,
               group_width: int = 128, grouped_conv: str = 'auto', stem_width: int | None = None,
               remat: bool = False, name: str = 'NFNet'):
    super().__init__(name=name)
    config = models.get_variant('nfnet', variant)
    self.num_classes = num_classes
    self.depths = tuple(depths if depths is not None else config['depths'])
    base_widths = widths if widths is not None else config['widths']
    self.widths = tuple(int(w * width) for w in base_widths)
    if len(self.depths) != len(STRIDES) or len(self.widths) != len(STRIDES):
      raise ConfigError(f'depths and widths need {len(STRIDES)} stages, got {self.depths} and '
                        f'{self.widths}')
    self.drop_rate = drop_rate
    self.remat = remat
    self.activation = layers.get_activation(activation)
    conv = lambda ch, stride, name: layers.WSConv2D(ch, 3, stride=stride, name=name)
    stem_widths = (*STEM_WIDTHS, stem_width or self.widths[0] // 2)
    self.stem = [conv(ch, stride, f'stem_conv{i}')
                 for i, (ch, stride) in enumerate(zip(stem_widths, STEM_STRIDES))]
    plans = layers.block_schedule(stem_widths[-1], self.widths, self.depths, STRIDES, alpha=alpha,
                                  stochdepth_rate=stochdepth_rate)
    self.blocks = [NFBlock(plan, alpha=alpha, se_ratio=se_ratio, group_width=group_width, activation=activation,
                           grouped_conv=grouped_conv) for plan in plans]
    self.final_conv = layers.WSConv2D(2 * plans[-1].out_channels, 1, name='final_conv')
    self.linear = hk.Linear(num_classes, w_init=hk.initializers.RandomNormal(0.01), name='linear')

  def __call__(self, x: jax.Array, is_training: bool, return_metrics: bool = False):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'NFNet expects NHWC RGB images, got shape {x.shape}.')
    for i, stem_conv in enumerate(self.stem):
      x = stem_conv(x)
      if i < len(self.stem) - 1:
        x = self.activation(x)
    x, signal = layers.run_blocks(self.blocks, x, is_training, return_metrics, self.remat)
    x = self.activation(self.final_conv(x))
    return layers.pooled_classifier(x, self.linear, drop_rate=self.drop_rate, is_training=is_training,
                                    signal=signal, return_metrics=return_metrics)


# ---- Reading the reference checkpoints' trees (module names as in the published F*_haiku.npz files). ----

CLASSIFIER_MODULE = 'NFNet/~/linear'
_BLOCK_RE = re.compile(r'^NFNet/~/nf_block(?:_(\d+))?(?:/~/.*)?$')
_KNOWN_MODULE_RE = re.compile(
    r'^NFNet/~/(?:stem_conv[0-3]|final_conv|linear|nf_block(?:_\d+)?'
    r'(?:/~/(?:conv0|conv1|conv1b|conv2|conv_shortcut|squeeze_excite/~/linear(?:_1)?))?)$')


def _block_name(index: int) -> str:
  return 'NFNet/~/nf_block' + (f'_{index}' if index else '')


def num_classes_of(params: Mapping[str, Mapping[str, Any]]) -> int:
  """Number of classes of the classifier in an NFNet params tree."""
  try:
    return int(params[CLASSIFIER_MODULE]['w'].shape[-1])
  except KeyError:
    raise CheckpointError(f'checkpoint has no classifier {CLASSIFIER_MODULE}/w') from None


def infer_variant(params: Mapping[str, Mapping[str, Any]]) -> str:
  """Name of the NFNet variant ('F0'..'F7', 'F0+'..'F7+') whose architecture `params` describe."""
  unknown = sorted(m for m in params if not _KNOWN_MODULE_RE.match(m))
  if unknown:
    raise CheckpointError(f'unknown module {unknown[0]!r} in checkpoint ({len(unknown)} unknown in all); '
                          'expected NFNet reference names')
  indices = {int(m.group(1) or 0) for m in map(_BLOCK_RE.match, params) if m}
  if not indices or indices != set(range(max(indices) + 1)):
    raise CheckpointError(f'checkpoint blocks are not numbered 0..n-1 (found {sorted(indices)})')
  stage_starts = [i for i in sorted(indices) if f'{_block_name(i)}/~/conv_shortcut' in params]
  if not stage_starts or stage_starts[0] != 0:
    raise CheckpointError('checkpoint block 0 has no conv_shortcut; not an NFNet tree')
  depths = tuple(np.diff(stage_starts + [len(indices)]).tolist())
  try:
    widths = tuple(int(params[f'{_block_name(i)}/~/conv2']['w'].shape[-1]) for i in stage_starts)
  except KeyError as e:
    raise CheckpointError(f'checkpoint is missing a block conv2 weight: {e}') from None
  for name, entry in VARIANTS.items():
    if entry['depths'] == depths and entry['widths'] == widths:
      return name
  raise CheckpointError(f'no NFNet variant has depths {depths} and widths {widths}')


def config_from_reference(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """The model config entries a reference params tree implies: its variant and class count."""
  return dict(variant=infer_variant(params), num_classes=num_classes_of(params))


default_model_config = models.signature_config('nfnet', NFNet)


models.register(models.ModelFamily(
    name='nfnet',
    module=NFNet,
    variants=VARIANTS,
    default_model_config=default_model_config,
    classifier_module=CLASSIFIER_MODULE,
    config_from_reference=config_from_reference,
    training_only_keys=('drop_rate', 'stochdepth_rate', 'grouped_conv', 'remat'),
))
