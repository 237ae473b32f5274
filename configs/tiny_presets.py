"""What each family's `tiny` preset reached with its documented command: the one copy of these figures.

README.md (NFNet's), docs/models.md and docs/model_zoo_presets.md state them; tests/test_tiny_presets.py checks that the docs say what
this table says and reruns each command to check that it still reaches its figure (within two points).
Training is deterministic on one machine (a rerun prints the same final line), but another CPU or another
XLA version may round differently, hence the tolerance.
"""
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Measured:
  top1: float       # test top-1 %, as the run's `final:` line prints it (raw weights)
  ema_top1: float   # the same for the EMA weights
  seconds: int      # wall clock, start to end
  # (top1, ema_top1) on the newest tested pair (scripts/tested_stack.py) where that JAX's rounding lands the
  # run further away than the tests' tolerance; None: the figures above hold there too.
  newest_stack: Optional[tuple[float, float]] = None


# Measured on a 2-core Intel Xeon machine with Python 3.11 and jax/jaxlib 0.10.2 (the oldest tested pair). The
# wall-clock times include compiling (cold cache) and are the idle machine's, from the test suite's own runs
# of these commands (`--durations`, 2026-12-07); the NF-ResNet figures were measured on the merged code that
# day, the others on the branch that set them (the suite's reruns of the merged code stayed within two points).
# Keys are the config files' names (`configs/<family>.py`).
MEASURED = {
    'nfnet': Measured(top1=98.61, ema_top1=98.61, seconds=110),
    # Sensitive (docs/model_zoo_presets.md): jax 0.12.1's rounding lands it 3 points higher.
    'nf_resnet': Measured(top1=90.00, ema_top1=89.44, seconds=77, newest_stack=(93.06, 93.06)),
    'nf_regnet': Measured(top1=94.17, ema_top1=93.89, seconds=95),
    'se_resnext': Measured(top1=99.17, ema_top1=99.44, seconds=111),
}


def command(family: str) -> str:
  """The documented command that trains `family`'s tiny preset."""
  return f'python -m experiments.train --config configs/{family}.py:tiny'
