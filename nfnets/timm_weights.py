"""NFNet weights to and from timm's `NormFreeNet` state dicts (safetensors files), without PyTorch.

timm's `dm_nfnet_f0` ... `dm_nfnet_f6` are the DeepMind NFNets (deep-quad stem 16-32-64-128, GELU, SE with
ratio 0.5, two grouped 3x3 convs per block, skip gains, final conv to twice the last width); every one of
their tensors has a counterpart in this project's `NFNet`, so the conversion is a renaming plus a change of
layout and nothing else:

  timm key                                  ours                                          layout change
  stem.conv{1..4}.{weight,gain,bias}        NFNet/~/stem_conv{0..3}/{w,gain,bias}         conv: OIHW <-> HWIO
  stages.S.B.conv1 / conv2 / conv2b / conv3 NFNet/~/nf_block_i/~/conv0 / conv1 / conv1b / conv2
  stages.S.B.downsample.conv                NFNet/~/nf_block_i/~/conv_shortcut
  stages.S.B.attn_last.fc1 / fc2            .../squeeze_excite/~/linear / linear_1 {w,b}  1x1 conv [out, in, 1, 1] <-> [in, out]
  stages.S.B.skipinit_gain                  NFNet/~/nf_block_i/skip_gain                  (scalar)
  final_conv                                NFNet/~/final_conv
  head.fc.{weight,bias}                     NFNet/~/linear/{w,b}                          [out, in] <-> [in, out]

Conv gains are [O, 1, 1, 1] in timm and [O] here; `i` counts blocks over all stages. The model's
architecture (variant or depths/widths/group width/stem width overrides) and class count are read off the
shapes, as for the reference pickles. Only transposes and reshapes are applied, so a round trip is bitwise.

What the two models compute differs slightly (timm standardises weights with eps 1e-5 added to the variance
and uses the erf GELU; the reference, and this project, use max(var * fan_in, 1e-4) and the tanh GELU): see
docs/timm_weights.md for the measured difference.
"""
import functools
import json
import re
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from nfnets import models
from nfnets.errors import CheckpointError
from nfnets.models import nfnet

Params = dict[str, dict[str, np.ndarray]]

# timm's stem: `stem_type='deep_quad'` with its fixed 128 channels, i.e. our STEM_WIDTHS then 128.
TIMM_STEM_WIDTH = 128
TIMM_VARIANTS = tuple(f'F{i}' for i in range(7))  # dm_nfnet_f0 ... dm_nfnet_f6

# Every key a timm DeepMind-NFNet state dict may hold; a key outside these belongs to another model.
_KEY_RE = re.compile(
    r'^(?:stem\.conv[1-4]\.(?:weight|gain|bias)'
    r'|stages\.(\d+)\.(\d+)\.(?:skipinit_gain|(?:conv1|conv2|conv2b|conv3|downsample\.conv)\.(?:weight|gain|bias)'
    r'|attn_last\.fc[12]\.(?:weight|bias))'
    r'|final_conv\.(?:weight|gain|bias)|head\.fc\.(?:weight|bias))$')

_BLOCK_CONVS = {'conv0': 'conv1', 'conv1': 'conv2', 'conv1b': 'conv2b', 'conv2': 'conv3',
                'conv_shortcut': 'downsample.conv'}
_SE_LINEARS = {'linear': 'fc1', 'linear_1': 'fc2'}
_PARAM_NAMES = {'w': 'weight', 'b': 'bias', 'gain': 'gain', 'bias': 'bias'}


# Layouts: (ours -> timm, timm -> ours, our shape -> timm shape). Transposes only, so nothing is rounded.
def _conv_to_timm(w):
  return np.transpose(w, (3, 2, 0, 1))


def _conv_from_timm(w):
  return np.transpose(w, (2, 3, 1, 0))


_LAYOUTS = {
    'conv': (_conv_to_timm, _conv_from_timm, lambda s: (s[3], s[2], s[0], s[1])),
    'gain': (lambda g: g.reshape(-1, 1, 1, 1), lambda g: g.reshape(-1), lambda s: (s[0], 1, 1, 1)),
    'conv1x1': (lambda w: w.T[:, :, None, None], lambda w: w[:, :, 0, 0].T, lambda s: (s[1], s[0], 1, 1)),
    'linear': (lambda w: w.T, lambda w: w.T, lambda s: (s[1], s[0])),
    'same': (lambda v: v, lambda v: v, tuple),
}


def _block_names(depths) -> Iterator[tuple[str, str]]:
  """(our block module, timm block prefix) for every block, in order."""
  index = 0
  for stage, depth in enumerate(depths):
    for block in range(depth):
      yield 'NFNet/~/nf_block' + (f'_{index}' if index else ''), f'stages.{stage}.{block}'
      index += 1


@functools.lru_cache(maxsize=8)
def _abstract_params(model_json: str):
  """Our parameter shapes, traced once per model (tracing a full-size NFNet takes seconds)."""
  return models.abstract_params(json.loads(model_json))[0]


def _our_shapes(model_config: Mapping[str, Any]):
  return _abstract_params(json.dumps(dict(model_config), sort_keys=True))


def key_map(model_config: Mapping[str, Any]) -> dict[tuple[str, str], tuple[str, str]]:
  """{(our module, param): (timm key, layout)} for every parameter of the configured NFNet."""
  if model_config['name'] != 'nfnet':
    raise CheckpointError(f'timm conversion covers NFNets only, not {model_config["name"]} models')
  variant = models.get_variant('nfnet', model_config['variant'])
  depths = tuple(model_config.get('depths') or variant['depths'])
  abstract = _our_shapes(model_config)
  renamed = {f'NFNet/~/stem_conv{i}': f'stem.conv{i + 1}' for i in range(4)}
  renamed.update({'NFNet/~/final_conv': 'final_conv', 'NFNet/~/linear': 'head.fc'})
  skip_gains = {}
  for ours, theirs in _block_names(depths):
    skip_gains[ours] = f'{theirs}.skipinit_gain'
    renamed.update({f'{ours}/~/{conv}': f'{theirs}.{timm_conv}' for conv, timm_conv in _BLOCK_CONVS.items()})
    renamed.update({f'{ours}/~/squeeze_excite/~/{linear}': f'{theirs}.attn_last.{fc}'
                    for linear, fc in _SE_LINEARS.items()})
  mapping = {}
  for module, leaves in abstract.items():
    for name, leaf in leaves.items():
      if name == 'skip_gain':
        mapping[module, name] = (skip_gains[module], 'same')
        continue
      if name == 'w':
        layout = 'conv' if leaf.ndim == 4 else 'linear' if module == 'NFNet/~/linear' else 'conv1x1'
      else:
        layout = 'gain' if name == 'gain' else 'same'
      mapping[module, name] = (f'{renamed[module]}.{_PARAM_NAMES[name]}', layout)
  return mapping


def timm_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """The key -> shape list of the timm state dict that holds the configured NFNet."""
  abstract = _our_shapes(model_config)
  return {key: _LAYOUTS[layout][2](abstract[module][name].shape)
          for (module, name), (key, layout) in key_map(model_config).items()}


def _shape(value) -> tuple[int, ...]:
  return tuple(int(d) for d in value.shape)


def _check_keys(shapes: Mapping[str, tuple[int, ...]]) -> None:
  for key in sorted(shapes):
    if not _KEY_RE.match(key):
      raise CheckpointError(f'unexpected key {key!r}: not a timm dm_nfnet (DeepMind NFNet) state dict')


def _group_width(mids_and_group_inputs: list[tuple[int, int]]) -> int:
  """The group width that gives each stage its bottleneck: that of a grouped stage, else the widest."""
  grouped = [per_group for mid, per_group in mids_and_group_inputs if mid != per_group]
  return grouped[0] if grouped else max(mid for mid, _ in mids_and_group_inputs)


def model_config_of(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
  """The model config of the NFNet a timm state dict's key -> shape list holds.

  Raises CheckpointError naming the first offending key when the state dict is not a DeepMind NFNet that
  this project's NFNet expresses (another timm family, keys missing or extra, a shape that does not fit).
  """
  _check_keys(shapes)
  blocks: dict[int, set[int]] = {}
  for key in shapes:
    match = _KEY_RE.match(key)
    if match.group(1) is not None:
      blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  extra_stages, missing_stages = sorted(set(blocks) - set(range(4))), sorted(set(range(4)) - set(blocks))
  if extra_stages:
    first = min(k for k in shapes if k.startswith(f'stages.{extra_stages[0]}.'))
    raise CheckpointError(f'unexpected key {first!r}: an NFNet has four stages')
  if missing_stages:
    raise CheckpointError(f'missing key {f"stages.{missing_stages[0]}.0.conv3.weight"!r}: an NFNet has four stages')
  depths = []
  for stage in range(4):
    missing = sorted(set(range(max(blocks[stage]) + 1)) - blocks[stage])
    if missing:
      raise CheckpointError(f'missing key {f"stages.{stage}.{missing[0]}.conv3.weight"!r}: blocks not numbered '
                            f'0..n-1 in stage {stage}')
    depths.append(max(blocks[stage]) + 1)
  needed = ['stem.conv4.weight', 'head.fc.weight'] + [f'stages.{s}.0.{conv}.weight' for s in range(4)
                                                      for conv in ('conv2', 'conv3')]
  for key in needed:
    if key not in shapes:
      raise CheckpointError(f'missing key {key!r}')
    if len(shapes[key]) not in (2, 4) or min(shapes[key]) < 1:
      raise CheckpointError(f'{key} has shape {shapes[key]}, not a weight matrix or conv kernel')
  widths = tuple(shapes[f'stages.{s}.0.conv3.weight'][0] for s in range(4))
  group_width = _group_width([shapes[f'stages.{s}.0.conv2.weight'][:2] for s in range(4)])
  entries = dict(num_classes=shapes['head.fc.weight'][0])
  variant = next((name for name, entry in nfnet.VARIANTS.items()
                  if entry['depths'] == tuple(depths) and entry['widths'] == widths), None)
  if variant is None:
    variant = 'F0'
    entries.update(depths=tuple(depths), widths=widths)
  if group_width != 128:
    entries['group_width'] = group_width
  if shapes['stem.conv4.weight'][0] != widths[0] // 2:
    entries['stem_width'] = shapes['stem.conv4.weight'][0]
  model_config = models.model_config('nfnet', variant, **entries).to_dict()
  try:
    _check_shapes(shapes, model_config)
  except CheckpointError:
    raise
  except ValueError as e:  # Widths our NFNet cannot build, e.g. a bottleneck not divisible into its groups.
    raise CheckpointError(f'stages.*.0.conv2.weight / conv3.weight: widths {widths} with group width '
                          f'{group_width} make no NFNet ({str(e).splitlines()[0]})') from None
  return model_config


def _check_shapes(shapes: Mapping[str, tuple[int, ...]], model_config: Mapping[str, Any]) -> None:
  expected = timm_shapes(model_config)
  for key in sorted(set(expected) | set(shapes)):
    if key not in shapes:
      raise CheckpointError(f'missing key {key!r} ({len(set(expected) - set(shapes))} missing in all)')
    if key not in expected:
      raise CheckpointError(f'unexpected key {key!r} ({len(set(shapes) - set(expected))} extra in all)')
    if tuple(shapes[key]) != expected[key]:
      raise CheckpointError(f'{key} has shape {tuple(shapes[key])}, expected {expected[key]} for the NFNet '
                            'its other shapes describe')


def from_state_dict(state_dict: Mapping[str, np.ndarray]) -> tuple[Params, dict[str, Any]]:
  """(params, model config) of the NFNet in a timm state dict of numpy arrays."""
  for key in sorted(state_dict):
    value = state_dict[key]
    if not np.issubdtype(value.dtype, np.floating):
      raise CheckpointError(f'{key} is {value.dtype}, not floating point')
  model_config = model_config_of({key: _shape(value) for key, value in state_dict.items()})
  params: Params = {}
  for (module, name), (key, layout) in key_map(model_config).items():
    value = _LAYOUTS[layout][1](state_dict[key])
    params.setdefault(module, {})[name] = np.array(value, dtype=np.float32, order="C")  # (ascontiguousarray makes scalars 1-d)
  return params, model_config


def to_state_dict(params: Mapping[str, Mapping[str, Any]], model_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The timm state dict (numpy, float32) of an NFNet's params; raises CheckpointError if timm cannot hold it."""
  _check_timm_builds_it(model_config)
  mapping = key_map(model_config)
  unknown = sorted({(m, n) for m, leaves in params.items() for n in leaves} - set(mapping))
  if unknown:
    raise CheckpointError(f'param {"/".join(unknown[0])} is not part of the configured NFNet')
  state_dict = {}
  for (module, name), (key, layout) in mapping.items():
    try:
      value = np.asarray(jax.device_get(params[module][name]))
    except KeyError:
      raise CheckpointError(f'param {module}/{name} is missing') from None
    state_dict[key] = np.array(_LAYOUTS[layout][0](value), dtype=np.float32, order="C")
  return state_dict


def _make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
  """timm's channel rounding: to the nearest multiple of `divisor`, at least `divisor`, not below
  `round_limit` times the value."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < round_limit * value else rounded


def _stage_widths(model_config: Mapping[str, Any]) -> tuple[int, ...]:
  variant = models.get_variant('nfnet', model_config['variant'])
  return tuple(int(w * (model_config.get('width') or 1.0)) for w in (model_config.get('widths') or variant['widths']))


def _check_timm_builds_it(model_config: Mapping[str, Any]) -> None:
  """Refuses models whose tensors timm's NormFreeNet (DeepMind configuration) would size differently: it
  keeps a 128-wide stem and rounds stage, bottleneck and SE widths to multiples of 8 (and bottlenecks to
  whole groups; one narrower than a group is an error there)."""
  widths = _stage_widths(model_config)
  stem = model_config.get('stem_width') or widths[0] // 2
  if stem != TIMM_STEM_WIDTH:
    raise CheckpointError(f'the model\'s stem is {stem} wide; timm\'s NFNets have a {TIMM_STEM_WIDTH}-wide stem '
                          '(the wide F0+..F7+ variants have no timm counterpart)')
  group_width = model_config.get('group_width') or 128
  se_ratio = model_config.get('se_ratio', 0.5)
  for stage, width in enumerate(widths):
    timm_mid = _make_divisible(width * 0.5)
    groups = timm_mid // group_width
    if group_width % 8 == 0:
      timm_mid = groups * group_width
    problem = None
    if _make_divisible(width) != width:
      problem = f'width {width} is not a multiple of 8'
    elif groups == 0:
      problem = f'bottleneck {width // 2} is narrower than the group width {group_width}'
    elif timm_mid != nfnet.bottleneck_width(width, group_width)[0]:
      problem = f'timm\'s bottleneck would be {timm_mid} wide, ours is {nfnet.bottleneck_width(width, group_width)[0]}'
    elif _make_divisible(width * se_ratio, round_limit=0.0) != max(1, int(width * se_ratio)):
      problem = f'timm\'s squeeze-excite would be {_make_divisible(width * se_ratio, round_limit=0.0)} wide'
    if problem:
      raise CheckpointError(f'timm\'s NormFreeNet cannot hold this model: stage {stage}: {problem}')


def timm_model_line(model_config: Mapping[str, Any]) -> str:
  """The PyTorch expression that builds the timm model matching `model_config`."""
  num_classes = model_config['num_classes']
  variant = models.get_variant('nfnet', model_config['variant'])
  depths = tuple(model_config.get('depths') or variant['depths'])
  widths = _stage_widths(model_config)
  group_width = model_config.get('group_width') or 128
  defaults = nfnet.default_model_config(model_config['variant'])
  if (model_config['variant'] in TIMM_VARIANTS and (depths, widths) == (variant['depths'], variant['widths'])
      and group_width == 128 and all(model_config.get(k, defaults[k]) == defaults[k]
                                     for k in ('alpha', 'se_ratio', 'activation'))):
    return f"timm.create_model('dm_nfnet_{model_config['variant'].lower()}', num_classes={num_classes})"
  activation = {'gelu_exact': 'gelu'}.get(model_config.get('activation', 'gelu'), model_config.get('activation'))
  return ('timm.models.nfnet.NormFreeNet(timm.models.nfnet.NfCfg('
          f'depths={depths}, channels={widths}, alpha={model_config.get("alpha", 0.2)}, stem_type="deep_quad", '
          f'stem_chs={TIMM_STEM_WIDTH}, group_size={group_width}, bottle_ratio=0.5, '
          f'extra_conv=True, gamma_in_act=True, same_padding=True, skipinit=True, num_features={2 * widths[-1]}, '
          f'act_layer={activation!r}, attn_layer="se", attn_kwargs=dict(rd_ratio={model_config.get("se_ratio", 0.5)})'
          f'), num_classes={num_classes})')


def load(path: str | epath.PathLike) -> tuple[Params, dict[str, Any]]:
  """(params, model config) from a timm NFNet `.safetensors` file; every error names the file."""
  path = epath.Path(path)
  try:
    try:
      state_dict = safetensors.numpy.load(path.read_bytes())
    except OSError as e:
      raise CheckpointError(f'cannot read it ({e})') from None
    except (safetensors.SafetensorError, ValueError, TypeError) as e:
      raise CheckpointError(f'not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})'
                            ) from None
    return from_state_dict(state_dict)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None


def save(path: str | epath.PathLike, params: Mapping[str, Mapping[str, Any]], model_config: Mapping[str, Any]) -> None:
  """Writes the timm state dict of an NFNet to `path` (.safetensors). Refuses an existing file; on any error
  nothing is written."""
  path = epath.Path(path)
  if path.exists():
    raise CheckpointError(f'{path} already exists; choose a new output file')
  try:
    data = safetensors.numpy.save(to_state_dict(params, model_config))
  except CheckpointError as e:
    raise CheckpointError(f'cannot export to {path}: {e}') from None
  partial = path.parent / f'.{path.name}.partial'
  partial.write_bytes(data)
  partial.rename(path)
