"""Where a run's numbers go: JSON lines and TensorBoard event files in the workdir, from the primary host.

The workdir may be remote (`gs://...`): files go through `etils.epath`. Object stores cannot append, so
`metrics.jsonl` is rewritten whole (atomically, see `files.write_atomic`) on every write, and so is a remote
TensorBoard event file on every flush; both stay small (one line or record per logged scalar).
"""
import json
import math
from typing import Any, Mapping, Optional

import numpy as np
from etils import epath
from tensorboardX import SummaryWriter
from tensorboardX import record_writer

from nfnets import files


class _EpathRecordWriter:
  """An event file on a filesystem that cannot append: kept in memory, the whole object rewritten on flush."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = bytearray()

  def write(self, data: bytes) -> None:
    self._buffer += data

  def flush(self) -> None:
    self._path.write_bytes(bytes(self._buffer))

  def close(self) -> None:
    self.flush()


class _EpathRecordWriterFactory:
  """Lets tensorboardX write event files to the remote filesystems epath knows (gs://, s3://)."""

  def open(self, path: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


for _scheme in ('gs', 's3'):
  record_writer.register_writer_factory(_scheme, _EpathRecordWriterFactory())


def _scalar(value: Any) -> int | float:
  value = np.asarray(value)
  return int(value) if np.issubdtype(value.dtype, np.integer) else float(value)


def _json_number(value: int | float) -> Optional[int | float]:
  # JSON has no NaN or infinity (jq and JavaScript's JSON.parse reject Python's bare `NaN`); the row's
  # flags (e.g. train/finite) say what happened.
  return value if math.isfinite(value) else None


class MetricsWriter:
  """Appends `{'step': s, **metrics}` to `<workdir>/metrics.jsonl` and to TensorBoard under `<workdir>/tb`.

  The file is strict JSON: a non-finite value is written as `null` (TensorBoard gets the value itself).
  On hosts other than the primary one every call is a no-op, so callers need no `if`.
  """

  def __init__(self, workdir: str | epath.PathLike, *, enabled: bool = True):
    self._enabled = enabled
    if enabled:
      self._path = epath.Path(workdir) / 'metrics.jsonl'
      self._text = self._path.read_text() if self._path.exists() else ''  # a resumed run continues the file
      self._tensorboard = SummaryWriter(str(epath.Path(workdir) / 'tb'))

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = '',
            unprefixed: Optional[Mapping[str, Any]] = None) -> None:
    """One row: `metrics` with their names prefixed, and `unprefixed` (e.g. run-wide counts) as they are."""
    if not self._enabled:
      return
    scalars = {**{k: _scalar(v) for k, v in (unprefixed or {}).items()},
               **{prefix + k: _scalar(v) for k, v in metrics.items()}}
    row = {'step': int(step), **{k: _json_number(v) for k, v in scalars.items()}}
    self._text += json.dumps(row, allow_nan=False) + '\n'
    files.write_atomic(self._path, self._text)
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self._enabled:
      self._tensorboard.close()
