"""Small files that several hosts share (config.json, metrics.jsonl), written so no reader sees half of one."""
import os
import uuid

from etils import epath


def write_atomic(path: str | epath.PathLike, text: str) -> None:
  """Writes `text` to `path` under a temporary name, then moves it into place (replacing any old one).

  A reader sees the old content or the new, never a partial file: the rename is atomic on local and POSIX
  network filesystems, and on object stores (gs://) an object only becomes visible once fully uploaded.
  """
  path = epath.Path(path)
  temporary = path.parent / f'.{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  temporary.write_text(text)
  temporary.replace(path)
