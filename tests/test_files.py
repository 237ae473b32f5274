"""Shared small files are replaced atomically: a reader never sees half of one."""
import json
import threading

from nfnets import files


def test_concurrent_readers_never_see_a_partial_config(tmp_path):
  path = tmp_path / 'config.json'
  files.write_atomic(path, json.dumps({'version': -1}))
  # Large enough that a plain write would be observed half-done.
  padding = 'x' * 200_000
  failures, reads = [], [0]
  done = threading.Event()

  def read_until_done():
    while not done.is_set():
      try:
        json.loads(path.read_text())
      except json.JSONDecodeError as e:
        failures.append(e)
      reads[0] += 1

  reader = threading.Thread(target=read_until_done)
  reader.start()
  for version in range(300):
    files.write_atomic(path, json.dumps({'version': version, 'padding': padding}))
  done.set()
  reader.join()
  assert reads[0] > 100 and not failures
  assert json.loads(path.read_text())['version'] == 299
  assert [p.name for p in tmp_path.iterdir()] == ['config.json']  # no temporary left behind
