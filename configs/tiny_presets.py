"""What each family's `tiny` preset reached with its documented command: the one copy of these figures.

README.md (NFNet's), docs/models.md and docs/model_zoo_presets.md state them; tests/test_tiny_presets.py checks that the docs say what
this table says and reruns each command to check that it still reaches its figure (within two points).
Training is deterministic on one machine (a rerun prints the same final line), but another CPU or another
XLA version may round differently, hence the tolerance.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Measured:
  top1: float       # test top-1 %, as the run's `final:` line prints it (raw weights)
  ema_top1: float   # the same for the EMA weights
  seconds: int      # wall clock, start to end


# Measured on a shared 2-core Intel Xeon machine (jax/jaxlib 0.10.2). The wall-clock times include
# compiling; about eight other jobs shared the two cores (load average 9-30), so they are far above an idle
# machine's.
# Keys are the config files' names (`configs/<family>.py`).
MEASURED = {
    'nfnet': Measured(top1=98.89, ema_top1=98.89, seconds=2490),
    'nf_resnet': Measured(top1=92.50, ema_top1=91.67, seconds=343),
    'nf_regnet': Measured(top1=94.17, ema_top1=93.89, seconds=1163),
    'se_resnext': Measured(top1=99.17, ema_top1=99.44, seconds=2183),
}


def command(family: str) -> str:
  """The documented command that trains `family`'s tiny preset."""
  return f'python -m experiments.train --config configs/{family}.py:tiny'
