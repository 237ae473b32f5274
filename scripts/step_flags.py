"""The step benchmarks' flags, defined once: `scripts.benchmark train|eval|memory` reads them, and
`scripts.accelerator_benchmark` passes those the user gave on to each of its `scripts.benchmark train` runs.

Kept free of JAX, so that `scripts.benchmark input` does not import it.
"""
from absl import flags

from nfnets.errors import ConfigError

# The compute dtypes the models accept (`nfnets.models.make_forward`; tests/test_benchmark.py checks both ways).
DTYPES = ('float32', 'bfloat16', 'float16')

RESOLUTION = flags.DEFINE_integer('resolution', None, "Image size; default: the config's train (eval) resolution.")
BATCH = flags.DEFINE_integer('batch', 8, 'Batch size on the one device.')
DTYPE = flags.DEFINE_enum('dtype', None, DTYPES, "Compute dtype of the step; default: the config's.")
REMAT = flags.DEFINE_boolean('remat', None, "Rematerialise each residual block (sets config.model.remat); "
                             "default: the config's.")
STEPS = flags.DEFINE_integer('steps', 5, 'train/eval: timed steps.')
WARMUP = flags.DEFINE_integer('warmup', 1, 'train/eval: untimed steps after compiling.')
BASELINE = flags.DEFINE_enum('baseline', None, ('native', 'split'),
                             'train/eval: also time the step with the grouped convs in this mode, alternating.')
MATMUL_SIZE = flags.DEFINE_integer('matmul_size', None, 'train/eval: side of the square matmul that measures the '
                                   'peak; default by device.')

# What one timed run of a sweep takes from the sweep's command line (the sweep sets the batch itself).
PER_RUN = (RESOLUTION, DTYPE, REMAT, STEPS, WARMUP, BASELINE, MATMUL_SIZE)


def check() -> None:
  """One line for values no step benchmark can run with."""
  if (BATCH.value < 1 or STEPS.value < 1 or WARMUP.value < 0 or (RESOLUTION.value or 8) < 8
      or (MATMUL_SIZE.value or 1) < 1):
    raise ConfigError('need --batch >= 1, --steps >= 1, --warmup >= 0, --resolution >= 8 and --matmul_size >= 1')


def per_run_args() -> list[str]:
  """The PER_RUN flags the command line gave, spelt for a `scripts.benchmark train` command line."""
  return [holder.serialize() for holder in PER_RUN if holder.present]
