"""Classifies image files with a checkpoint: a reference F*_haiku.npz, or one written by this project.

  python -m scripts.classify photo.jpg --checkpoint F0_haiku.npz
  python -m scripts.classify digit.png --checkpoint runs/tiny-20261128-101500

Images get the evaluation preprocessing of the config (TensorFlow-matching bicubic resize to
(resolution + margin)^2, centre crop, normalisation); without --config a reference checkpoint uses its
variant's test resolution. Prints one JSON line per image with the top classes (indices in the
dataset's label order; for ImageNet, TFDS imagenet2012's) and their probabilities.
"""
import argparse
import json
import os
import sys

import jax
import numpy as np

from configs import nfnet as nfnet_configs
from experiments import common
from nfnets import checkpoint
from nfnets import evaluate
from nfnets import models
from nfnets import nfnet
from nfnets.data import ops_image


def _eval_geometry(checkpoint_path: str, model_config, config_arg: str | None) -> tuple[int, int]:
  """(resolution, margin): from --config, else the project checkpoint's own config, else the variant's table."""
  if config_arg:
    data = nfnet_configs.get_config(config_arg.rpartition(':')[2]).data
    return data.eval_resolution, data.eval_resize_margin
  if os.path.isfile(checkpoint_path):
    return nfnet.VARIANTS[model_config.variant]['test_imsize'], 32
  data = checkpoint.read_meta(checkpoint_path)['config']['data']
  return data['eval_resolution'], data['eval_resize_margin']


def classify(image_paths: list[str], checkpoint_path: str, config_arg: str | None = None,
             top: int = 5) -> list[dict]:
  """Top-`top` classes and probabilities of each image (EMA weights when the checkpoint has them)."""
  model_config, weight_sets = evaluate.load_checkpoint_weights(
      checkpoint_path, nfnet_configs.get_config('tiny').model)
  params, model_state = weight_sets.get('ema_', weight_sets[''])
  forward = models.make_forward(model_config, 'float32')
  res, margin = _eval_geometry(checkpoint_path, model_config, config_arg)
  images = []
  for path in image_paths:
    with open(path, 'rb') as f:
      image = ops_image.decode_image(f.read())
    images.append(ops_image.normalize(ops_image.eval_resize_and_crop(image, res, margin)))
  logits, _ = jax.jit(forward.apply, static_argnames='is_training')(
      params, model_state, None, np.stack(images), is_training=False)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  results = []
  for path, p in zip(image_paths, probs):
    best = np.argsort(-p)[:top]
    results.append({'image': path, 'top_classes': best.tolist(), 'probabilities': p[best].round(4).tolist()})
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('images', nargs='+')
  parser.add_argument('--checkpoint', required=True, help='F*_haiku.npz, a checkpoint directory or a workdir')
  parser.add_argument('--config', default=None,
                      help='configs/nfnet.py:ARG whose eval resolution to use; default: the checkpoint\'s own')
  parser.add_argument('--top', type=int, default=5)
  args = parser.parse_args(argv)
  try:
    for result in classify(args.images, args.checkpoint, args.config, args.top):
      print(json.dumps(result))
  except common.USER_ERRORS as e:
    common.report_error(e)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
