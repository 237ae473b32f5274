"""The dataset registry: every dataset the project reads, by `config.data.name`, and the generic TFDS path.

A dataset is one file in this package that registers a `Dataset` (its name, splits and their sizes, class
count, how to prepare it and the `config.data` preprocessing that suits it): `imagenet.py`, `digits.py`,
`synthetic.py`. Any other TFDS image-classification dataset prepared as array_record is read by the name
`tfds:NAME` without registering anything. The rest of the library reaches datasets only through

  dataset_info(config.data)          class count and split sizes
  get_source(config.data, split)     a random-access source of the split's examples

Every source is a sequence (`len`, `[index]`) of `{'image': encoded image bytes, 'label': int}`.
Images stay encoded so that the training pipeline can crop before it decodes, and so that all
datasets go through the same decoding code.

To add a dataset: write `nfnets/data/<dataset>.py` with a `register(Dataset(...))` call and import it at
the bottom of this file (docs/extending.md).
"""
import dataclasses
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

from etils import epath
import ml_collections

from nfnets.errors import ConfigError
from nfnets.errors import DataNotFoundError

# 'tfds:oxford_flowers102' names any TFDS dataset with an 'image' and a class 'label' feature, prepared in
# array_record format (`tfds build oxford_flowers102 --file_format=array_record`).
TFDS_PREFIX = 'tfds:'

Source = Sequence[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What the library needs to know about one registered dataset.

  Attributes:
    name: its `config.data.name`, e.g. 'imagenet2012'.
    num_classes: the number of classes (labels are 0 .. num_classes - 1).
    num_examples: canonical split name -> number of examples.
    source: `(split, data_dir) -> source` of the split's encoded examples; `data_dir` None means the
      dataset's default location. `split` may be a TFDS split string ('train[:10%]') where the data is TFDS's.
    preparation: how to prepare it, one sentence for error messages and docs; `{data_dir}` stands for the
      data directory.
    data_config: the `config.data` entries that suit the dataset (its splits and default preprocessing),
      applied by `configs.common.use_dataset`.
  """
  name: str
  num_classes: int
  num_examples: Mapping[str, int]
  source: Callable[[str, Optional[str]], Source]
  preparation: str
  data_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
  if dataset.name in _DATASETS:
    raise ValueError(f'dataset {dataset.name!r} is registered twice')
  if dataset.name.startswith(TFDS_PREFIX):
    raise ValueError(f'dataset name {dataset.name!r}: the {TFDS_PREFIX} prefix names unregistered TFDS datasets')
  _DATASETS[dataset.name] = dataset
  return dataset


def dataset_names() -> tuple[str, ...]:
  return tuple(sorted(_DATASETS))


def get_dataset(name: str) -> Dataset:
  """The registered dataset `name`, with a one-line error naming the known ones."""
  if name not in _DATASETS:
    raise ConfigError(f'Unknown dataset {name!r} in config.data.name; use one of {", ".join(dataset_names())}, '
                      f'or {TFDS_PREFIX}NAME for a TFDS dataset prepared as array_record.')
  return _DATASETS[name]


class DatasetInfo(NamedTuple):
  """What the rest of the code needs to know about a dataset before reading it."""
  num_classes: int
  num_examples: dict[str, int]


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Number of classes and examples per canonical split of `data_config.name`."""
  tfds_name = _tfds_name(data_config.name)
  if tfds_name is not None:
    return tfds_info(tfds_name, _tfds_data_dir(data_config))
  dataset = get_dataset(data_config.name)
  return DatasetInfo(dataset.num_classes, dict(dataset.num_examples))


def get_source(data_config: ml_collections.ConfigDict, split: str) -> Source:
  """A random-access source of `{'image': bytes, 'label': int}` for one split.

  Args:
    data_config: `config.data`; uses `name` and `data_dir` (None: the dataset's default).
    split: a TFDS split string ('train', 'validation', 'train[:10%]', ...); the synthetic
      source accepts 'train', 'validation' and 'test'.

  Raises:
    DataNotFoundError: the dataset has not been prepared under the data directory.
    ConfigError: unknown dataset or split.
  """
  tfds_name = _tfds_name(data_config.name)
  if tfds_name is not None:
    data_dir = _tfds_data_dir(data_config)
    tfds_info(tfds_name, data_dir)  # the features must be an image and a class label
    return tfds_source(tfds_name, split, data_dir)
  return get_dataset(data_config.name).source(split, data_config.get('data_dir'))


def tfds_default_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(
      os.path.expanduser('~'), 'tensorflow_datasets')


def _tfds_name(name: str) -> Optional[str]:
  """NAME of 'tfds:NAME'; None for any other name."""
  if not name.startswith(TFDS_PREFIX):
    return None
  if len(name) == len(TFDS_PREFIX):
    get_dataset(name)  # the unknown-dataset error
  return name[len(TFDS_PREFIX):]


def _tfds_data_dir(data_config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(data_config.get('data_dir') or tfds_default_data_dir())


def tfds_info(tfds_name: str, data_dir: str) -> DatasetInfo:
  """Classes and split sizes of a prepared TFDS dataset, read from its dataset_info.json."""
  import tensorflow_datasets as tfds  # Deferred: the synthetic source does without it.
  version_dir = require_array_record(tfds_name, data_dir, preparation=(
      f'prepare it with `tfds build {tfds_name} --data_dir {data_dir} --file_format=array_record`'))
  info = tfds.builder_from_directory(str(version_dir)).info
  names = set(info.features.keys())
  label = info.features['label'] if {'image', 'label'} <= names else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise ConfigError(f'{tfds_name} under {version_dir} is not an image classification dataset: it needs an '
                      f"'image' feature and a class 'label' feature, it has {sorted(names)}")
  return DatasetInfo(label.num_classes, {k: v.num_examples for k, v in info.splits.items()})


def require_array_record(tfds_name: str, data_dir: str, preparation: str) -> epath.Path:
  """The newest prepared version directory of `tfds_name` under `data_dir`, which must hold array_record files.

  Raises:
    DataNotFoundError: there is none; the message ends with `preparation` (how to prepare it).
  """
  # epath, not glob: data_dir may be a bucket (gs://...) on cloud hosts.
  versions = sorted(str(p) for p in (epath.Path(data_dir) / tfds_name).glob('*/dataset_info.json'))
  if not versions:
    raise DataNotFoundError(
        f'{tfds_name} not found under {data_dir} (set config.data.data_dir or $TFDS_DATA_DIR); '
        f'{preparation}.')
  version_dir = epath.Path(versions[-1]).parent
  if not any(version_dir.glob('*.array_record-*')):
    raise DataNotFoundError(
        f'{tfds_name} under {version_dir} has no array_record files (prepared as TFRecord?); '
        f'{preparation}.')
  return version_dir


def tfds_source(tfds_name: str, split: str, data_dir: str) -> Source:
  """The split of a TFDS dataset prepared as array_record under `data_dir`, images left encoded."""
  import tensorflow_datasets as tfds  # Deferred: the synthetic source does without it.
  return tfds.data_source(
      tfds_name, split=split, data_dir=data_dir, download=False,
      decoders={'image': tfds.decode.SkipDecoding()})


# Datasets register themselves on import.
# pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.data import digits
from nfnets.data import imagenet
from nfnets.data import synthetic
