"""Trains a model; with no arguments, the `tiny` NFNet on the bundled digits dataset (a few CPU minutes).

  python -m experiments.train
  python -m experiments.train --config configs/nfnet.py:F0 --workdir gs://bucket/f0 --config.optimizer.agc_lambda=0.02
  # the F0 recipe (batch 4096) on 8 GPUs without bfloat16: micro-batches of 64, float16 with loss scaling
  python -m experiments.train --config configs/nfnet.py:F0 --config.train.accumulation_steps=8 \
      --config.precision.compute_dtype=float16
  # fine-tuning: start from a reference or project checkpoint, new classifier for the dataset's classes
  python -m experiments.train --config configs/finetune.py:F0 --config.init_from=F0_haiku.npz

Rerunning with the same --workdir resumes from its latest checkpoint.
"""
import time

from absl import app
from absl import flags
from etils import epath
import jax

from nfnets import cli
from nfnets import trainer
from nfnets.errors import ConfigError

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and logs, local or gs://; an existing run there is '
                               'resumed. Default (single-process runs only): runs/<config arg>-<time> under the '
                               'current directory.')
_STOP_AFTER_STEP = flags.DEFINE_integer('stop_after_step', None, 'Checkpoint and exit at this step, as on '
                                        'preemption; rerun the same command to continue (e.g. to split a run into '
                                        'scheduler-sized chunks).')
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  cli.initialize_distributed(config)
  if _WORKDIR.value is None and jax.process_count() > 1:
    raise ConfigError('a multi-process run needs --workdir (each process would invent a runs/<config>-<time> '
                      'of its own)')
  workdir = _WORKDIR.value or epath.Path('runs') / f'{cli.config_name()}-{time.strftime("%Y%m%d-%H%M%S")}'
  trainer.train_and_evaluate(config, workdir, stop_after_step=_STOP_AFTER_STEP.value)


if __name__ == '__main__':
  cli.run(main)
