"""What the studies and the paper-table reproduction share: their result tables, and releasing the compiled
programs of one model before the next is measured in the same process."""
import csv
import gc
import io
from typing import Any, Mapping, Sequence

import jax


def csv_text(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A CSV with a header of `columns` and one row per record; a missing or None entry is empty, other keys are
  left out."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction='ignore', lineterminator='\n')
  writer.writeheader()
  for record in records:
    writer.writerow({key: '' if record.get(key) is None else record[key] for key in columns})
  return buffer.getvalue()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table of already formatted cells."""
  lines = [f'| {" | ".join(header)} |', '|' + '---|' * len(header)]
  lines += [f'| {" | ".join(row)} |' for row in rows]
  return '\n'.join(lines) + '\n'


def release_compiled_programs() -> None:
  """Drops every compiled program and the buffers only they held.

  On CPU each compiled model holds thousands of memory mappings: a process that measures model after model (a
  sweep's runs, a folder of checkpoints) would pass Linux's per-process limit (vm.max_map_count) and crash. The
  next model compiles its own programs anyway.
  """
  jax.clear_caches()
  gc.collect()
