"""Classifies image files with a checkpoint: a reference F*_haiku.npz, or one written by this project.

  python -m scripts.classify photo.jpg --checkpoint F0_haiku.npz
  python -m scripts.classify digit.png --checkpoint runs/tiny-20261128-101500 [--config configs/nfnet.py:tiny]

Images get the evaluation preprocessing of the config (`nfnets.data.eval_image`: the reference's TensorFlow
JPEG decode and bicubic resize to (resolution + margin)^2, centre crop, normalisation), in float32. Without
--config a project checkpoint uses its run's own config and a reference checkpoint its variant's recipe (test
resolution); a --config that contradicts the checkpoint is refused. Prints one JSON line per image with the
top classes (indices in the dataset's label order; for ImageNet, TFDS imagenet2012's) and their probabilities.
"""
import json

import jax
from absl import flags
from etils import epath
import ml_collections
import numpy as np

import configs
from nfnets import checkpoint
from nfnets import cli
from nfnets import models
import nfnets.data
from nfnets.errors import UserError

_CONFIG = cli.define_config_flag('Config whose evaluation preprocessing to use; default: the checkpoint\'s own.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'F*_haiku.npz, a timm .safetensors, a checkpoint directory or a '
                                  'workdir.')
_TOP = flags.DEFINE_integer('top', 5, 'How many classes to print per image.')
flags.mark_flag_as_required('checkpoint')


def classify(image_paths: list[str], loaded: checkpoint.Checkpoint, config: ml_collections.ConfigDict,
             top: int = 5) -> list[dict]:
  """Top-`top` classes and probabilities of each image (EMA weights when the checkpoint has them)."""
  params, model_state = loaded.weight_sets.get('ema_', loaded.weight_sets[''])
  forward = models.make_forward(loaded.model_config, config.precision.eval_compute_dtype)
  images = []
  for path in image_paths:
    path = epath.Path(path)
    if not path.is_file():
      raise UserError(f'no image file {path}')
    images.append(nfnets.data.eval_image(path.read_bytes(), config.data.eval_resolution,
                                         config.data.eval_resize_margin))
  logits, _ = jax.jit(forward.apply, static_argnames='is_training')(
      params, model_state, None, np.stack(images), is_training=False)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  results = []
  for path, p in zip(image_paths, probs):
    best = np.argsort(-p)[:top]
    results.append({'image': path, 'top_classes': best.tolist(), 'probabilities': p[best].round(4).tolist()})
  return results


def main(argv):
  if len(argv) < 2:
    raise UserError('name at least one image file')
  cli.require_config_for_overrides()
  loaded = checkpoint.read(_CHECKPOINT.value)
  config = configs.for_checkpoint(loaded, _CONFIG.value if cli.config_given() else None)
  for result in classify(argv[1:], loaded, config, _TOP.value):
    print(json.dumps(result))


if __name__ == '__main__':
  cli.run(main)
