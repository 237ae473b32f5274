r"""One-time ImageNet preparation: the ILSVRC2012 tars -> TFDS imagenet2012 in array_record.

  python -m scripts.prepare_imagenet --manual_dir ~/imagenet_tars --data_dir ~/tensorflow_datasets
  python -m scripts.prepare_imagenet --manual_dir ~/imagenet_tars --config configs/nfnet.py:F0 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets

`--manual_dir` holds the archives downloaded from image-net.org (ILSVRC2012_img_train.tar and/or
ILSVRC2012_img_val.tar). The work is `nfnets.data.imagenet.prepare`; its docstring says what it builds.
"""
from absl import app
from absl import flags

from nfnets import cli
from nfnets.data import imagenet

_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, f'Directory holding {imagenet.TRAIN_TAR} and/or {imagenet.VAL_TAR}.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'TFDS data directory to write to (default: $TFDS_DATA_DIR or '
    '~/tensorflow_datasets, or --config\'s data.data_dir); point config.data.data_dir here.')
_CONFIG = cli.define_config_flag('Config whose data.data_dir to prepare, when --data_dir is not given.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  data_dir = imagenet.prepare(_MANUAL_DIR.value, _DATA_DIR.value or _CONFIG.value.data.data_dir)
  print(f'{imagenet.NAME} is ready; train with config.data.data_dir={data_dir}')


if __name__ == '__main__':
  flags.mark_flag_as_required('manual_dir')
  cli.run(main)
