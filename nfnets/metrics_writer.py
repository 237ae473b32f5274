"""Where a run's numbers go: JSON lines and TensorBoard event files in the workdir, from the primary host.

The workdir may be remote (`gs://...`): files go through `etils.epath`. Object stores cannot append, so
`metrics.jsonl` is rewritten whole (atomically, see `files.write_atomic`) on every write, and so is a remote
TensorBoard event file on every flush; both stay small (one line or record per logged scalar).
"""
import json
from typing import Any, Mapping

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


class MetricsWriter:
  """Appends `{'step': s, **metrics}` to `<workdir>/metrics.jsonl` and to TensorBoard under `<workdir>/tb`.

  On hosts other than the primary one every call is a no-op, so callers need no `if`.
  """

  def __init__(self, workdir: str | epath.PathLike, *, enabled: bool = True):
    self._enabled = enabled
    if enabled:
      self._path = epath.Path(workdir) / 'metrics.jsonl'
      self._text = self._path.read_text() if self._path.exists() else ''  # a resumed run continues the file
      self._tensorboard = SummaryWriter(str(epath.Path(workdir) / 'tb'))

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = '') -> None:
    if not self._enabled:
      return
    scalars = {prefix + k: float(np.asarray(v)) for k, v in metrics.items()}
    self._text += json.dumps({'step': int(step), **scalars}) + '\n'
    files.write_atomic(self._path, self._text)
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self._enabled:
      self._tensorboard.close()
