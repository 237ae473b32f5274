"""Signal propagation plots (Brock et al. 2021, "Characterizing signal propagation..."): per residual block, at
initialisation, on a batch of real images, the average squared channel mean and the average channel variance
of the block's output, and the variance of its residual branch.

Works for any model of the registry whose module, called with `return_metrics=True`, returns a dict with
'signal_propagation': {block module name: {'avg_sq_mean', 'avg_var', 'res_avg_var'}}. Blocks are ordered by
name with numbers compared as numbers (Haiku numbers repeated modules in creation order: nf_block, nf_block_1,
..., nf_block_10), because the dict's own order does not survive JAX's tree functions.
"""
import re
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from etils import epath
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets import models
from nfnets.data import ops_image
from nfnets.data import sources
from nfnets.errors import ConfigError
from nfnets.errors import UserError
from nfnets.studies import sweeps

# (metric key, panel title), in panel order.
METRICS = (('avg_sq_mean', 'average squared channel mean'),
           ('avg_var', 'average channel variance'),
           ('res_avg_var', 'residual branch variance'))


class Series(NamedTuple):
  """One model's statistics: block names in execution order and {metric: values per block (NaN: not reported)}."""
  label: str
  blocks: list[str]
  values: dict[str, np.ndarray]


def gaussian_images(count: int, resolution: int, seed: int = 0) -> np.ndarray:
  """Unit Gaussian noise shaped like `count` normalised images: the input the theory's variances assume."""
  if count <= 0 or resolution <= 0:
    raise ConfigError(f'need a positive number of images and resolution, got {count} and {resolution}')
  return np.random.default_rng(seed).standard_normal((count, resolution, resolution, 3)).astype(np.float32)


def eval_images(data_config: ml_collections.ConfigDict, split: str, count: int, resolution: int,
                margin: int) -> np.ndarray:
  """The first `count` images of `split`, through the evaluation preprocessing, as float32 [N, R, R, 3]."""
  if count <= 0 or resolution <= 0:
    raise ConfigError(f'need a positive number of images and resolution, got {count} and {resolution}')
  source = sources.get_source(data_config, split)
  if len(source) < count:
    raise ConfigError(f'{data_config.name} {split} holds {len(source)} images, fewer than the {count} asked for')
  return np.stack([ops_image.eval_image(source[index]['image'], resolution, margin)
                   for index in range(count)]).astype(np.float32)


def _with_skip_gains(params: hk.Params, value: float) -> tuple[hk.Params, int]:
  """`params` with every 'skip_gain' set to `value`, and how many there were."""
  count = 0

  def replace(module_params):
    nonlocal count
    updated = dict(module_params)
    if 'skip_gain' in updated:
      updated['skip_gain'] = jnp.full_like(updated['skip_gain'], value)
      count += 1
    return updated

  return {module: replace(p) for module, p in params.items()}, count


def block_statistics(model_config: Mapping[str, Any], images: np.ndarray, *, seed: int = 0,
                     skip_gain: Optional[float] = None, regularisers: bool = False
                     ) -> tuple[list[str], dict[str, np.ndarray], int]:
  """The model's per-block statistics at initialisation on `images`, in float32.

  The forward pass runs in training mode, as the paper measured: a batch-normalised model normalises with the
  batch's own statistics (its moving averages hold nothing yet at initialisation). Stochastic depth and dropout
  are off unless `regularisers`, so a normaliser-free model computes what it computes in inference.

  Args:
    model_config: a `config.model` section of any registered family.
    images: normalised float32 [N, H, W, 3].
    seed: initialisation seed.
    skip_gain: if given, every 'skip_gain' parameter is set to it (NFNets initialise them to 0, which makes
      every block an identity at initialisation; 1 shows what the residual branches add).
    regularisers: keep stochastic depth and dropout at the config's rates.

  Returns:
    (block names in execution order, {metric: float64 values per block, NaN where not reported}, number of
    skip gains set).
  """
  model_config = dict(model_config)
  if not regularisers:
    model_config.update({key: 0.0 for key in ('stochdepth_rate', 'drop_rate') if key in model_config})
  forward = models.make_forward(model_config, 'float32', return_metrics=True)
  init_rng, apply_rng = jax.random.split(jax.random.PRNGKey(seed))

  def statistics(params, state, rng, x):
    outputs, _ = forward.apply(params, state, rng, x, is_training=True)
    signal = outputs.get('signal_propagation') if isinstance(outputs, dict) else None
    if not signal:
      raise UserError(f'{model_config["name"]} models report no signal_propagation metrics')
    return signal

  try:
    params, state = jax.jit(lambda rng, x: forward.init(rng, x, is_training=True))(init_rng, images[:1])
    gains_set = 0
    if skip_gain is not None:
      params, gains_set = _with_skip_gains(params, skip_gain)
    signal = jax.device_get(jax.jit(statistics)(params, state, apply_rng, images))
  except TypeError as e:
    if 'return_metrics' not in str(e):
      raise
    raise UserError(f'{model_config["name"]} models report no signal_propagation metrics '
                    '(their call takes no return_metrics)') from None
  order = sorted(signal, key=block_order)
  values = {key: np.array([float(signal[block].get(key, np.nan)) for block in order]) for key, _ in METRICS}
  return order, values, gains_set


def block_order(name: str) -> list[Any]:
  """Sort key: 'nf_block_2' before 'nf_block_10', and the unnumbered 'nf_block' first."""
  return [(0, int(token)) if token.isdigit() else (1, token) for token in re.split(r'(\d+)', name) if token]


def csv_text(series: Sequence[Series]) -> str:
  """One row per (model, block): label, block_index, block, and the three metrics."""
  columns = ('model', 'block_index', 'block', *(key for key, _ in METRICS))
  records = [{'model': s.label, 'block_index': index, 'block': block,
              **{key: repr(float(s.values[key][index])) for key, _ in METRICS}}
             for s in series for index, block in enumerate(s.blocks)]
  return sweeps.csv_text(records, columns)


def plot(series: Sequence[Series], path: str, title: str = '') -> None:
  """The three panels against block index, one line per model, as a PNG (matplotlib's Agg backend).

  A panel whose values span more than a factor of 20 gets a logarithmic axis.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.8))
  for axis, (key, panel_title) in zip(axes, METRICS):
    for s in series:
      axis.plot(np.arange(len(s.blocks)), s.values[key], marker='o', markersize=3, label=s.label)
    finite = np.concatenate([s.values[key][np.isfinite(s.values[key])] for s in series])
    if finite.size and finite.min() > 0 and finite.max() > 20 * finite.min():
      axis.set_yscale('log')  # stage transitions can shrink white noise's variance by orders of magnitude
    axis.set_title(panel_title)
    axis.set_xlabel('residual block')
    axis.grid(alpha=0.3)
  axes[0].legend()
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  with epath.Path(path).open('wb') as f:
    figure.savefig(f, format='png', dpi=120)
  plt.close(figure)
