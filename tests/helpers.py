"""What several test files share: the repository's root, NFNet parameter shapes, a fake reference checkpoint
(a published `F*_haiku.npz` file, byte layout and all) and a free localhost port."""
import os
import socket

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_shapes(params) -> dict:
  """{module: {name: shape}} of a Haiku params tree, of arrays or of abstract (eval_shape) ones."""
  return {m: {n: tuple(a.shape) for n, a in p.items()} for m, p in params.items()}


def nfnet_shapes(variant: str) -> dict:
  """`module_shapes` of NFNet `variant` (1000 classes), as the reference checkpoints hold it."""
  from nfnets import models  # pylint: disable=import-outside-toplevel  (the jax-free tests import REPO_ROOT)
  params, _ = models.abstract_params(models.model_config('nfnet', variant))
  return module_shapes(params)


def reference_params(variant: str = 'F0', seed: int = 0) -> dict:
  """NFNet `variant`'s params in the reference tree layout, with non-trivial random values."""
  from tests import reference_forward  # pylint: disable=import-outside-toplevel
  return reference_forward.random_params(nfnet_shapes(variant), seed=seed)


def write_reference_checkpoint(path, params: dict):
  """Writes `params` as the published F*_haiku.npz files are written (a dill 0.3.3 pickle of Haiku 0.0.3
  FlatMappings, see `reference_pickle`), without Haiku or dill; returns `path`."""
  from tests import reference_pickle  # pylint: disable=import-outside-toplevel
  with reference_pickle.stand_in_modules() as stand_ins, open(path, 'wb') as f:
    reference_pickle.dump(stand_ins, params, f)
  return path


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
