"""Where a run's numbers go: JSON lines and TensorBoard event files in the workdir, from the primary host."""
import json
import os
from typing import Any, Mapping

import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends `{'step': s, **metrics}` to `<workdir>/metrics.jsonl` and to TensorBoard under `<workdir>/tb`.

  On hosts other than the primary one every call is a no-op, so callers need no `if`.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._enabled = enabled
    if enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = '') -> None:
    if not self._enabled:
      return
    scalars = {prefix + k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()
