"""Benchmarks, one sub-command each; every run prints ONE JSON line.

  python -m scripts.benchmark input --config configs/nfnet.py:F0 [--num_images 256] [--seconds 10]
  python -m scripts.benchmark input --config configs/nfnet.py:F0 --workers N [--batch_size 256]
  python -m scripts.benchmark train --config configs/nfnet.py:F0 --resolution 192 --batch 8 \
      --dtype float32 --steps 5 [--baseline native] [--config.model.grouped_conv=native]
  python -m scripts.benchmark eval --config configs/nfnet.py:F0 --resolution 256 --batch 8
  python -m scripts.benchmark memory --config configs/nfnet.py:F3 --batch 32 [--remat] [--accumulation_steps 4]

The config comes through the shared command-line layer (`--config path:arg`, `--config.data.x=value`
overrides; default configs/nfnet.py:F0); `input` reads its `data` section.

`train` and `eval` time the loop's own pmapped steps on one device (see `scripts/step_timing.py`):
compile seconds, step seconds, images/s, XLA's FLOPs per step, achieved FLOP/s and its fraction of the
device's matmul peak measured in the same run (MFU), and peak host memory. `--resolution`, `--batch`
and `--dtype` set the config's train and eval fields alike; `--baseline MODE` also builds the step with
the model's grouped convs run as MODE (`native`: the straightforward formulation) and alternates the
two.

`memory` compiles the train step at `--batch` examples per device without running it and reports the
memory XLA assigns to it per device (arguments, outputs, temporaries, total; see `scripts/step_memory.py`).
`--remat` (like `--config.model.remat=True`) rematerialises each residual block; `--accumulation_steps k`
compiles the update of k micro-batches of `--batch` examples (the accumulated step); `--nocompile` reports
only the state's size and the activations saved for the backward pass, which need no compile.

`input` times the full training transform of `nfnets.data` (the reference's: per example two crops
decoded at full resolution, random-resized crop, flip, TF bicubic resize to float32, MixUp/CutMix of
the pair, clip to uint8, RandAugment; the uint8 result is what the pipeline hands to the device) on a
few hundred ImageNet-like JPEGs, next to a straightforward Pillow version of the same transform
written the way timm does it (Pillow decode, crop then Pillow resize, mixing in float64 numpy,
RandAugment on PIL images with bilinear geometric ops). Both consume the same two JPEGs per example
and produce uint8 images and mixed targets. Both run in this process pinned to one core, alternating
in rounds so that load drift hits both; the project's transform is then run once more with one
pinned process per available core for the total rate. Rates count training examples.

With `--workers N` (-1: as many as the usable cores give, 0: threads of this process only), `input`
instead times the training pipeline itself with `config.data.num_workers = N` on the generated JPEGs,
worker processes included (`scripts/pipeline_benchmark.py`): examples/s, per core and per CPU-second,
the worker layout and the memory in flight; `--eval_pipeline` times the evaluation pipeline.

The JPEGs are made from the two photos shipped with scikit-learn (china.jpg, flower.jpg, 427x640): a
random crop (aspect 0.6-1.7, 35-100 % of the area) resized to a long side of 300-500 px (80 %) or
500-900 px (20 %), saved at JPEG quality 70-95, roughly ImageNet's spread of sizes and qualities.
"""
import concurrent.futures
import io
import json
import multiprocessing
import os
import tempfile
import time
import types
from typing import Any, Callable, Dict, List, Sequence

from absl import flags
import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from nfnets import cli
from nfnets.data import mix
from nfnets.data import train_transform
from nfnets.errors import ConfigError
from scripts import step_flags

DEFAULT_INPUT_SETTINGS = dict(train_resolution=192, randaugment_layers=4, randaugment_magnitude=5.0,
                              mix='mixup_cutmix', mixup_alpha=0.2, randaugment_semantics='reference')
NUM_CLASSES = 1000


def input_settings(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The data settings the input benchmark needs, from `config.data`."""
  return {key: config.data[key] for key in DEFAULT_INPUT_SETTINGS}


def make_jpegs(num_images: int, directory: str, seed: int = 0) -> List[bytes]:
  """Writes `num_images` varied ImageNet-like JPEGs into `directory` and returns their bytes."""
  from sklearn.datasets import load_sample_image  # Slow import; only the benchmark needs it.
  sources = [Image.fromarray(load_sample_image(name)) for name in ('china.jpg', 'flower.jpg')]
  rng = np.random.default_rng(seed)
  encoded = []
  for index in range(num_images):
    source = sources[index % len(sources)]
    aspect = rng.uniform(0.6, 1.7)
    area = rng.uniform(0.35, 1.0) * source.width * source.height
    crop_w = int(min(source.width, np.sqrt(area * aspect)))
    crop_h = int(min(source.height, crop_w / aspect))
    left = int(rng.integers(0, source.width - crop_w + 1))
    top = int(rng.integers(0, source.height - crop_h + 1))
    long_side = rng.uniform(300, 500) if rng.random() < 0.8 else rng.uniform(500, 900)
    scale = long_side / max(crop_w, crop_h)
    image = source.crop((left, top, left + crop_w, top + crop_h)).resize(
        (max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.BICUBIC)
    path = os.path.join(directory, f'image_{index:04d}.jpg')
    image.save(path, 'JPEG', quality=int(rng.integers(70, 96)))
    with open(path, 'rb') as f:
      encoded.append(f.read())
  return encoded


def crops_per_example(settings: Dict[str, Any]) -> int:
  """JPEGs one training example is made from: two with MixUp/CutMix, else one."""
  return 2 if settings['mix'] == 'mixup_cutmix' else 1


def _train_transform(settings: Dict[str, Any], per_device: int) -> train_transform.TrainTransform:
  return train_transform.TrainTransform(
      resolution=settings['train_resolution'], num_classes=NUM_CLASSES, per_device=per_device,
      mix_mode=settings['mix'], mixup_alpha=settings['mixup_alpha'],
      randaugment_layers=settings['randaugment_layers'],
      randaugment_magnitude=settings['randaugment_magnitude'],
      randaugment_semantics=settings['randaugment_semantics'])


def project_transform(jpegs: Sequence[bytes], labels: np.ndarray, rng: np.random.Generator,
                      settings: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """The pipeline's per-example transform over one device batch made from `jpegs`."""
  group = crops_per_example(settings)
  batch = len(jpegs) // group
  transform = _train_transform(settings, per_device=batch)
  examples = [{'image': image, 'label': label} for image, label in zip(jpegs, labels)]
  outputs = [transform(examples[i * group:(i + 1) * group], i, rng) for i in range(batch)]
  return {'images': np.stack([o['image'] for o in outputs]),
          'labels': np.stack([o['targets'] for o in outputs])}


def _baseline_random_resized_crop(image: Image.Image, size: int, rng) -> Image.Image:
  # torchvision's RandomResizedCrop parameters: area uniform, log-uniform aspect, 10 tries.
  width, height = image.size
  for _ in range(10):
    area = rng.uniform(0.08, 1.0) * width * height
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w, crop_h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
      break
  else:
    crop_w = crop_h = min(width, height)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
  return image.crop((left, top, left + crop_w, top + crop_h)).resize((size, size), Image.BICUBIC)


def _baseline_randaugment(image: Image.Image, rng, layers: int, magnitude: float) -> Image.Image:
  level = magnitude / 10
  sign = lambda: 1 if rng.random() < 0.5 else -1
  fill = (128, 128, 128)
  ops: List[Callable[[Image.Image], Image.Image]] = [
      ImageOps.autocontrast, ImageOps.equalize, ImageOps.invert,
      lambda x: x.rotate(sign() * 30 * level, resample=Image.BILINEAR, fillcolor=fill),
      lambda x: ImageOps.posterize(x, max(1, int(4 * level))),
      lambda x: ImageOps.solarize(x, int(256 * level)),
      lambda x: ImageEnhance.Color(x).enhance(1.8 * level + 0.1),
      lambda x: ImageEnhance.Contrast(x).enhance(1.8 * level + 0.1),
      lambda x: ImageEnhance.Brightness(x).enhance(1.8 * level + 0.1),
      lambda x: ImageEnhance.Sharpness(x).enhance(1.8 * level + 0.1),
      lambda x: x.transform(x.size, Image.AFFINE, (1, sign() * 0.3 * level, 0, 0, 1, 0),
                            resample=Image.BILINEAR, fillcolor=fill),
      lambda x: x.transform(x.size, Image.AFFINE, (1, 0, 0, sign() * 0.3 * level, 1, 0),
                            resample=Image.BILINEAR, fillcolor=fill),
      lambda x: x.transform(x.size, Image.AFFINE, (1, 0, sign() * 100 * level, 0, 1, 0),
                            resample=Image.BILINEAR, fillcolor=fill),
      lambda x: x.transform(x.size, Image.AFFINE, (1, 0, 0, 0, 1, sign() * 100 * level),
                            resample=Image.BILINEAR, fillcolor=fill),
      lambda x: _baseline_cutout(x, int(40 * level), rng),
      lambda x: x.point(lambda v: min(255, v + int(110 * level)) if v < 128 else v),
  ]
  for _ in range(layers):
    image = ops[rng.integers(0, len(ops))](image)
  return image


def _baseline_cutout(image: Image.Image, half: int, rng) -> Image.Image:
  pixels = np.array(image)
  y, x = rng.integers(0, pixels.shape[0]), rng.integers(0, pixels.shape[1])
  pixels[max(0, y - half):y + half, max(0, x - half):x + half] = 128
  return Image.fromarray(pixels)


def baseline_transform(jpegs: Sequence[bytes], labels: np.ndarray, rng: np.random.Generator,
                       settings: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """Straightforward Pillow transform, timm style: decode/crop/flip each JPEG, mix pairs, RandAugment."""
  size = settings['train_resolution']
  crops = []
  for data in jpegs:
    image = Image.open(io.BytesIO(data)).convert('RGB')
    image = _baseline_random_resized_crop(image, size, rng)
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    crops.append(np.asarray(image, dtype=np.float64))
  crops = np.stack(crops)
  targets = np.eye(NUM_CLASSES)[labels]
  if settings['mix'] == 'mixup_cutmix':
    # Disjoint pairs (2i, 2i + 1): MixUp for the first half of the examples, CutMix for the rest.
    first, second = crops[0::2], crops[1::2]
    images, mixed_targets = first.copy(), targets[0::2].copy()
    half = len(images) // 2
    ratio = rng.beta(settings['mixup_alpha'], settings['mixup_alpha'], size=half)
    images[:half] = (ratio[:, None, None, None] * first[:half]
                     + (1 - ratio[:, None, None, None]) * second[:half])
    mixed_targets[:half] = ratio[:, None] * targets[0:2 * half:2] + (1 - ratio[:, None]) * targets[1:2 * half:2]
    for i in range(half, len(images)):
      top, bottom, left, right = mix.cutmix_box(size, size, rng)
      images[i] = second[i]
      images[i, top:bottom, left:right] = first[i, top:bottom, left:right]
      kept = (bottom - top) * (right - left) / size**2
      mixed_targets[i] = kept * targets[2 * i] + (1 - kept) * targets[2 * i + 1]
    crops, targets = images, mixed_targets
  outputs = []
  for image in np.clip(crops, 0, 255).astype(np.uint8):
    image = Image.fromarray(image)
    if settings['randaugment_layers']:
      image = _baseline_randaugment(image, rng, settings['randaugment_layers'],
                                    settings['randaugment_magnitude'])
    outputs.append(np.asarray(image))
  return {'images': np.stack(outputs), 'labels': targets.astype(np.float32)}


def _time_transform(transform, jpegs, settings, batch_size, seconds, seed) -> Dict[str, float]:
  """Runs whole batches for about `seconds` (at least one); returns examples and elapsed seconds."""
  rng = np.random.default_rng(seed)
  labels_rng = np.random.default_rng(seed + 1)
  num_jpegs = batch_size * crops_per_example(settings)
  count, start, position = 0, time.perf_counter(), 0
  while True:
    batch = [jpegs[(position + k) % len(jpegs)] for k in range(num_jpegs)]
    position += num_jpegs
    transform(batch, labels_rng.integers(0, NUM_CLASSES, size=num_jpegs), rng, settings)
    count += batch_size
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return {'images': count, 'seconds': elapsed}


def _pinned_worker(cpu, jpegs, settings, batch_size, seconds, seed):
  os.sched_setaffinity(0, {cpu})
  return _time_transform(project_transform, jpegs, settings, batch_size, seconds, seed)


def run_input(args, config: ml_collections.ConfigDict) -> Dict[str, Any]:
  settings = input_settings(config)
  cpus = sorted(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as directory:
    jpegs = make_jpegs(args.num_images, directory, args.seed)
    sizes = [Image.open(io.BytesIO(b)).size for b in jpegs]
  batch_size = min(args.batch_size, args.num_images)

  os.sched_setaffinity(0, {cpus[0]})
  transforms = {'project': project_transform, 'baseline': baseline_transform}
  totals = {name: {'images': 0, 'seconds': 0.0} for name in transforms}
  for name, transform in transforms.items():  # Warm-up: caches, lazy imports.
    _time_transform(transform, jpegs, settings, batch_size, 0, args.seed)
  for round_index in range(args.rounds):
    for name, transform in transforms.items():
      result = _time_transform(transform, jpegs, settings, batch_size,
                               args.seconds / args.rounds, args.seed + round_index)
      totals[name]['images'] += result['images']
      totals[name]['seconds'] += result['seconds']
  os.sched_setaffinity(0, set(cpus))
  per_core = {name: t['images'] / t['seconds'] for name, t in totals.items()}

  context = multiprocessing.get_context('fork')
  with concurrent.futures.ProcessPoolExecutor(len(cpus), mp_context=context) as pool:
    futures = [pool.submit(_pinned_worker, cpu, jpegs, settings, batch_size, args.seconds / 2,
                           args.seed + 100 + i) for i, cpu in enumerate(cpus)]
    results = [f.result() for f in futures]
  all_cores = sum(r['images'] for r in results) / max(r['seconds'] for r in results)

  widths, heights = zip(*sizes)
  return {
      'benchmark': 'input',
      'config': cli.config_name(),
      **settings,
      'num_images': args.num_images,
      'image_size_mean_hw': [round(float(np.mean(heights))), round(float(np.mean(widths)))],
      'image_long_side_range': [int(min(map(max, sizes))), int(max(map(max, sizes)))],
      'batch_size': batch_size,
      'crops_per_example': crops_per_example(settings),
      'cores': len(cpus),
      'images_per_s': round(all_cores, 1),
      'images_per_s_per_core': round(per_core['project'], 1),
      'baseline_images_per_s_per_core': round(per_core['baseline'], 1),
      'speedup_per_core': round(per_core['project'] / per_core['baseline'], 2),
      'timed_images': {name: t['images'] for name, t in totals.items()},
  }


def run_input_pipeline(args, config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Examples/s of the training (or eval) pipeline as training runs it, worker processes included."""
  from scripts import pipeline_benchmark  # Imports JAX: only this mode needs it.
  settings = input_settings(config)
  with tempfile.TemporaryDirectory() as directory:
    jpegs = make_jpegs(args.num_images, directory, args.seed)
  report = pipeline_benchmark.run(
      config.data, jpegs, workers=args.workers, batch_size=args.batch_size, seconds=args.seconds,
      seed=args.seed, num_classes=NUM_CLASSES, eval_pipeline=args.eval_pipeline,
      min_train_examples=2 * args.batch_size * crops_per_example(settings))
  return {'benchmark': 'eval_pipeline' if args.eval_pipeline else 'input_pipeline',
          'config': cli.config_name(), **settings,
          'crops_per_example': crops_per_example(settings), **report}


def run_step(args, config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The train or eval step benchmark (`args.command`) of `config` with the command line's overrides."""
  from scripts import step_timing  # Imports JAX and the model: only the step benchmarks need them.
  resolution = args.resolution or (config.data.train_resolution if args.command == 'train'
                                   else config.data.eval_resolution)
  config = step_timing.apply_overrides(config, batch=args.batch, resolution=resolution, dtype=args.dtype,
                                       remat=args.remat)
  report = step_timing.run(args.command, config, steps=args.steps, warmup=args.warmup,
                           baseline_grouped_conv=args.baseline, matmul_size=args.matmul_size)
  return {'config': args.config_name, **report}


def run_memory(args, config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The train step's memory report at `args.batch` examples per device."""
  from scripts import step_memory, step_timing  # Import JAX and the model: only the step commands need them.
  config = step_timing.apply_overrides(config, batch=args.batch, resolution=args.resolution or
                                       config.data.train_resolution, dtype=args.dtype, remat=args.remat)
  config.train.accumulation_steps = args.accumulation_steps
  return {'config': args.config_name, **step_memory.report(config, args.batch, compile_step=args.compile)}


SUBCOMMANDS = {'input': run_input, 'train': run_step, 'eval': run_step, 'memory': run_memory}


_CONFIG = cli.define_config_flag('Config to benchmark (input: its data section).',
                                   default=os.path.join(cli.REPO_ROOT, 'configs', 'nfnet.py') + ':F0')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 256, 'How many JPEGs to generate (cycled through while timing).')
_SECONDS = flags.DEFINE_float('seconds', 10.0, 'Timing budget per transform on one core (at least one batch).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Examples per timed batch.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternations project/baseline within the time budget.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the generated JPEGs and the transforms.')
_WORKERS = flags.DEFINE_integer('workers', None, 'input: time the training pipeline itself with this '
                                'config.data.num_workers (-1: from the usable cores; 0: threads only).')
_EVAL_PIPELINE = flags.DEFINE_bool('eval_pipeline', False, 'input --workers N: time the evaluation pipeline.')
_ACCUMULATION_STEPS = flags.DEFINE_integer('accumulation_steps', 1, 'memory: micro-batches of --batch examples '
                                           'per update (sets config.train.accumulation_steps).')
_COMPILE = flags.DEFINE_boolean('compile', True, 'memory: compile the step for XLA\'s figures; --nocompile '
                                'reports only the state and the saved activations (tracing alone).')


def _step_args(command: str) -> types.SimpleNamespace:
  step_flags.check()
  if _ACCUMULATION_STEPS.value < 1:
    raise ConfigError('need --accumulation_steps >= 1')
  return types.SimpleNamespace(
      command=command, config_name=cli.config_name(), resolution=step_flags.RESOLUTION.value,
      batch=step_flags.BATCH.value, dtype=step_flags.DTYPE.value, steps=step_flags.STEPS.value,
      warmup=step_flags.WARMUP.value, baseline=step_flags.BASELINE.value, matmul_size=step_flags.MATMUL_SIZE.value,
      remat=step_flags.REMAT.value, compile=_COMPILE.value, accumulation_steps=_ACCUMULATION_STEPS.value)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise ConfigError(f'name one benchmark: {", ".join(SUBCOMMANDS)}')
  if argv[1] == 'input':
    if _NUM_IMAGES.value < 1 or _SECONDS.value < 0 or _BATCH_SIZE.value < 1 or _ROUNDS.value < 1:
      raise ConfigError('need --num_images >= 1, --seconds >= 0, --batch_size >= 1 and --rounds >= 1')
    if (_WORKERS.value or 0) < -1:
      raise ConfigError('need --workers >= -1')
    if _EVAL_PIPELINE.value and _WORKERS.value is None:
      raise ConfigError('--eval_pipeline times the pipeline itself: give --workers N too')
    args = types.SimpleNamespace(num_images=_NUM_IMAGES.value, seconds=_SECONDS.value,
                                 batch_size=_BATCH_SIZE.value, rounds=_ROUNDS.value, seed=_SEED.value,
                                 workers=_WORKERS.value, eval_pipeline=_EVAL_PIPELINE.value)
    if args.workers is not None:
      print(json.dumps(run_input_pipeline(args, _CONFIG.value)), flush=True)
      return
  else:
    args = _step_args(argv[1])
  print(json.dumps(SUBCOMMANDS[argv[1]](args, _CONFIG.value)), flush=True)


if __name__ == '__main__':
  cli.run(main)
