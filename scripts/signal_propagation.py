"""Signal propagation plots at initialisation: per residual block, the average squared channel mean, the average
channel variance and the residual branch's variance, on real images; a PNG (three panels) and a CSV beside it.

  python -m scripts.signal_propagation --variant F0 --out spp.png
  # every skip gain at 1 instead of NFNets' 0, to see what the residual branches add (alpha^2 per block)
  python -m scripts.signal_propagation --variant F0 --skip_gain=1 --out spp.png
  # two models side by side: any two configs of registered families whose models report the metrics
  python -m scripts.signal_propagation --config configs/nfnet.py:F0 --compare configs/nfnet.py:F0 \
      --compare.model.alpha=0.5 --skip_gain=1 --out spp_alpha.png
  # NFNet-F0 beside its batch-normalised twin (same topology, BN instead of weight standardisation)
  python -m scripts.signal_propagation --config configs/nfnet.py:F0 --compare configs/se_resnext.py:F0 \
      --images=gaussian --out spp_nf_vs_bn.png
  # ImageNet validation images instead of the bundled digits
  python -m scripts.signal_propagation --config configs/nfnet.py:F0 --images=config \
      --config.data.data_dir=~/tensorflow_datasets --out spp.png

Images: `--images=digits` (default) takes the bundled handwritten digits' test split; `--images=config` the
config's own evaluation split (`config.data`: name, data_dir, eval_split); both through the evaluation
preprocessing. `--images=gaussian` feeds unit Gaussian noise instead, the input the variance analysis assumes
(weight-standardised convolutions map flat image regions, most of a digit, to zero). The size is each
config's `data.eval_resolution` (or `--resolution`). Without --config the model is NFNet
`--variant` (default F0) with its recipe (configs/nfnet.py:VARIANT). Prints one line per model.
The forward pass is in training mode (batch-normalised models use the batch's statistics, as the paper
measured) with stochastic depth and dropout off (`--regularisers` keeps them).
"""
from absl import flags
from etils import epath
import ml_collections
from ml_collections import config_flags

from configs import nfnet as nfnet_configs
from nfnets import cli
from nfnets.errors import ConfigError
from nfnets.errors import UserError
from nfnets.studies import signal_propagation

_CONFIG = cli.define_config_flag('The model (and, with --images=config, the data) to measure.')
_COMPARE = config_flags.DEFINE_config_file('compare', None, 'A second config drawn beside the first, as path:arg; '
                                           '--compare.x=value overrides its fields.', lock_config=True)
_VARIANT = flags.DEFINE_string('variant', None, 'Without --config: the NFNet variant to measure (default F0).')
_OUT = cli.define_out_flag('The PNG to write; the CSV goes beside it (same name, .csv).')
_IMAGES = flags.DEFINE_enum('images', 'digits', ['digits', 'config', 'gaussian'], 'digits: the bundled digits\' '
                            'test split; config: the config\'s data.eval_split; gaussian: unit Gaussian noise.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 32, 'Images in the batch the statistics are taken over.')
_RESOLUTION = flags.DEFINE_integer('resolution', None, 'Image size; default: each config\'s data.eval_resolution.')
_SKIP_GAIN = flags.DEFINE_float('skip_gain', None, 'Set every skip_gain parameter to this value (NFNets start at 0).')
_REGULARISERS = flags.DEFINE_bool('regularisers', False, 'Keep stochastic depth and dropout at the config\'s '
                                  'rates (default: off, so only the initialisation is measured).')
flags.mark_flag_as_required('out')


def _main_config() -> tuple[ml_collections.ConfigDict, str]:
  if cli.config_given():
    if _VARIANT.value:
      raise ConfigError('give --variant or --config, not both')
    return _CONFIG.value, cli.config_name()
  cli.require_config_for_overrides()
  variant = _VARIANT.value or 'F0'
  try:
    return nfnet_configs.get_config(variant), variant
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _compare_config() -> tuple[ml_collections.ConfigDict, str] | None:
  if flags.FLAGS['compare'].value is None:
    return None
  try:
    config = _COMPARE.value
    config.model  # pylint: disable=pointless-statement  (a file that failed to load raises only when read)
    return config, cli.config_name('compare')
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    raise ConfigError(f'bad --compare: {" ".join(str(e).split())}') from None


def _labels(configs: list[tuple[ml_collections.ConfigDict, str]]) -> list[str]:
  """The configs' names; when they coincide, followed by the model entries that tell them apart."""
  names = [name for _, name in configs]
  if len(set(names)) == len(names):
    return names
  families = [config.model.name for config, _ in configs]
  if len(set(families)) == len(families):  # e.g. NFNet F0 beside the batch-normalised F0
    return [f'{family} {name}' for family, name in zip(families, names)]
  models = [config.model.to_dict() for config, _ in configs]
  differing = sorted(k for k in set().union(*models) if len({repr(m.get(k)) for m in models}) > 1)
  return [f'{name} ({", ".join(f"{k}={m.get(k)}" for k in differing)})' if differing else f'{name} #{i + 1}'
          for i, (name, m) in enumerate(zip(names, models))]


def _images_for(config: ml_collections.ConfigDict, cache: dict):
  resolution = _RESOLUTION.value or config.data.eval_resolution
  if _IMAGES.value == 'gaussian':
    return signal_propagation.gaussian_images(_NUM_IMAGES.value, resolution)
  if _IMAGES.value == 'digits':
    data = ml_collections.ConfigDict(dict(
        name='digits', data_dir=config.data.data_dir if config.data.name == 'digits' else None))
    split = 'test'
  else:
    data, split = config.data, config.data.eval_split
  key = (data.name, data.data_dir, split, resolution, config.data.eval_resize_margin)
  if key not in cache:
    cache[key] = signal_propagation.eval_images(data, split, _NUM_IMAGES.value, resolution,
                                                config.data.eval_resize_margin)
  return cache[key]


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  out = epath.Path(_OUT.value).expanduser()
  if out.suffix.lower() != '.png':
    raise ConfigError(f'--out must name a .png file, got {_OUT.value}')
  configs = [_main_config()]
  compare = _compare_config()
  if compare is not None:
    configs.append(compare)
  series, cache = [], {}
  for (config, _), label in zip(configs, _labels(configs)):
    images = _images_for(config, cache)
    blocks, values, gains_set = signal_propagation.block_statistics(
        config.model, images, seed=config.seed, skip_gain=_SKIP_GAIN.value, regularisers=_REGULARISERS.value)
    series.append(signal_propagation.Series(label, blocks, values))
    note = ''
    if _SKIP_GAIN.value is not None:
      note = f', {gains_set} skip gains set to {_SKIP_GAIN.value:g}' if gains_set else ', no skip gains to set'
    print(f'{label}: {len(blocks)} blocks, {images.shape[0]} images at {images.shape[1]}²{note}; final block '
          f'avg_var {values["avg_var"][-1]:.4g}, avg_sq_mean {values["avg_sq_mean"][-1]:.4g}')
  out.parent.mkdir(parents=True, exist_ok=True)
  title = 'signal propagation at initialisation (batch statistics'
  title += ', with stochastic depth and dropout)' if _REGULARISERS.value else ')'
  signal_propagation.plot(series, str(out), title=title)
  csv_path = out.with_suffix('.csv')
  csv_path.write_text(signal_propagation.csv_text(series))
  print(f'wrote {out} and {csv_path}')


if __name__ == '__main__':
  cli.run(main)
