"""The AGC ablation: clipping mode (none, global norm, AGC at several lambda) x batch size x learning rate.

  # The CPU default: tiny NFNet on the bundled digits, 6 epochs without warmup, 5 runs
  python -m experiments.agc_ablation --workdir runs/agc_ablation
  # Any config and overrides, as for experiments.train; grid flags take comma-separated lists
  python -m experiments.agc_ablation --config configs/nfnet.py:F0 --workdir DIR \
      --batch_sizes=1024,4096 --learning_rates=0.1,0.4 --lambdas=0.01,0.02,0.04,0.08 --modes=none,agc

Each run trains in `<workdir>/<mode>-lam<lambda>-bs<batch>-lr<base lr>` (for global_norm, lambda is the
norm threshold); rerunning the same command skips finished runs and resumes the unfinished one. Writes
results.csv, results.md, top1_vs_lambda.png and loss_curves.png into the workdir. Runs on one host.
"""
import sys

from absl import app
from absl import flags
import jax

from nfnets import cli
from nfnets.errors import ConfigError
from nfnets.studies import ablation

# Without --config: the tiny preset, shortened to show within minutes on a CPU what the paper shows.
# A --config.x=value on the command line still wins over these.
DEFAULT_SETTINGS = {'train.epochs': 6.0, 'optimizer.warmup_epochs': 0.0, 'train.log_every_steps': 5}

_CONFIG = cli.define_config_flag(
    'Base config, as path:arg; without it tiny with '
    f'{", ".join(f"{k}={v}" for k, v in DEFAULT_SETTINGS.items())}.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/agc_ablation', 'One sub-workdir per run, the tables and plots.')
_MODES = flags.DEFINE_list('modes', list(ablation.MODES), f'Clipping modes, of {", ".join(ablation.MODES)}.')
_LAMBDAS = flags.DEFINE_list('lambdas', ['0.01', '0.04', '0.16'], 'AGC lambdas (optimizer.agc_lambda).')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['64'], 'Global batch sizes.')
_LEARNING_RATES = flags.DEFINE_list('learning_rates', ['1.6'], 'Base learning rates, scaled by '
                                    'batch_size / optimizer.reference_batch_size.')
_GLOBAL_NORM_THRESHOLD = flags.DEFINE_float('global_norm_threshold', 1.0,
                                            'optimizer.global_norm_threshold of the global_norm runs.')


def _numbers(flag: flags.FlagHolder, kind: type) -> list:
  try:
    return [kind(value) for value in flag.value]
  except ValueError as e:
    raise ConfigError(f'--{flag.name}: {", ".join(flag.value)} is not a list of numbers') from e


def _default_settings() -> dict:
  """DEFAULT_SETTINGS without --config, less any field the command line overrides itself."""
  if cli.config_given():
    return {}
  overridden = {arg[len('--config.'):].partition('=')[0] for arg in sys.argv[1:] if arg.startswith('--config.')}
  return {k: v for k, v in DEFAULT_SETTINGS.items() if k not in overridden}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  grid = ablation.make_grid(_MODES.value, _numbers(_LAMBDAS, float), _numbers(_BATCH_SIZES, int),
                            _numbers(_LEARNING_RATES, float), _GLOBAL_NORM_THRESHOLD.value)
  config = _CONFIG.value
  config.update_from_flattened_dict(_default_settings())
  if not jax.config.jax_compilation_cache_dir and '://' not in _WORKDIR.value:
    # Runs of one mode share their initialisation and every run its evaluation step, and a resumed sweep
    # its interrupted run's train step: keep compiled programs next to the runs.
    jax.config.update('jax_compilation_cache_dir', f'{_WORKDIR.value}/xla_cache')
  results = ablation.run_sweep(config, grid, _WORKDIR.value)
  if len(results) == len(grid):
    from nfnets.studies import ablation_plots  # pylint: disable=g-import-not-at-top  (matplotlib: only when plotting)
    for path in ablation_plots.write_plots(results, _WORKDIR.value):
      print(f'wrote {path}')
    print(f'\n{ablation.markdown_table(results)}')


if __name__ == '__main__':
  cli.run(main)
