"""Access to tests/fixtures/tf_reference.npz: JPEGs and TensorFlow's outputs on them.

Written once by tests/fixtures/make_tf_fixtures.py under TensorFlow 2.21; reading it needs numpy only.
"""
import functools
import os

import numpy as np

from tests.helpers import REPO_ROOT

PATH = os.path.join(REPO_ROOT, 'tests', 'fixtures', 'tf_reference.npz')


@functools.lru_cache(maxsize=1)
def load() -> dict:
  with np.load(PATH) as arrays:
    return {key: arrays[key] for key in arrays.files}


def num_images() -> int:
  return sum(key.startswith('jpeg_') for key in load())


def jpeg(index: int) -> bytes:
  return load()[f'jpeg_{index}'].tobytes()


def get(name: str, index: int) -> np.ndarray:
  return load()[f'{name}_{index}']


def setting(name: str) -> int:
  return int(load()[name])
