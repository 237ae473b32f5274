"""The paper's NFNet table beside ours: architecture measured from our models, accuracy measured from checkpoints.

  # parameters and MACs only (abstract tracing, well under a minute on a CPU)
  python -m scripts.reproduce_table --out results/
  # and the top-1/top-5 of every checkpoint in a folder (reference F*_haiku.npz files, timm .safetensors files,
  # converted or trained project checkpoints) on ImageNet's validation split, each at its variant's test resolution
  python -m scripts.reproduce_table --checkpoints ~/nfnet_checkpoints --out results/ \
      --config.data.data_dir=~/tensorflow_datasets

Each published row (configs/nfnet.py: PUBLISHED) gets our parameter count and MACs at its test resolution,
the train / test resolutions, the published top-1 / top-5 and, for each checkpoint of that model, the measured
ones (EMA weights when the checkpoint has them). A checkpoint's row is its variant's; 'F5-sam' for a project
F5 trained with SAM; the reference F6 file is the SAM-trained F6. Every checkpoint is evaluated with its
variant's recipe (configs/nfnet.py:VARIANT); `--config.x=value` overrides apply to all of them (e.g. the data
directory, `data.eval_split='validation[:10000]'` for a quick look, or the evaluation batch size).
Prints the markdown table, then one `skipped: ...` line for each thing it could not measure and why;
`--out DIR` also writes DIR/table.md and DIR/table.csv.
"""
import dataclasses
import functools
import json
from typing import Any, Optional, Sequence

from absl import flags
from etils import epath
import ml_collections
from ml_collections import config_flags

import configs
from configs import nfnet as nfnet_configs
from nfnets import checkpoint
from nfnets import cli
from nfnets import evaluate
from nfnets import flops
from nfnets.data import sources
from nfnets.errors import ConfigError
from nfnets.errors import UserError
from nfnets.studies import sweeps

cli.define_config_flag('Not a file here: each row uses configs/nfnet.py:ROW; give only --config.x '
                             'overrides, applied to every row.')
_CHECKPOINTS = flags.DEFINE_string('checkpoints', None, 'A folder of checkpoints to evaluate: reference '
                                   'F*_haiku.npz files, timm dm_nfnet .safetensors files and/or project '
                                   'checkpoint directories (workdirs).')
_OUT = cli.define_out_flag('Folder for table.md and table.csv (local or gs://).')
_ROWS = flags.DEFINE_list('rows', list(nfnet_configs.PUBLISHED), 'Published rows to show.')

CSV_COLUMNS = ('row', 'params_millions', 'published_params_millions', 'macs_billions',
               'published_macs_billions', 'train_resolution', 'test_resolution', 'published_top1',
               'published_top5', 'top1', 'top5', 'weights', 'eval_resolution', 'eval_examples', 'checkpoint')


@dataclasses.dataclass
class Measured:
  """One checkpoint's accuracy (%) and how it was measured."""
  checkpoint: str
  weights: str          # 'ema' or 'raw'
  top1: float
  top5: float
  eval_resolution: int
  eval_examples: int


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """`config` with the command line's `--config.x=value` overrides (a flat {dotted name: value} dict)."""
  config = ml_collections.ConfigDict(config.to_dict())
  try:
    config.update_from_flattened_dict(dict(overrides))
  except (KeyError, AttributeError, TypeError) as e:
    raise ConfigError(f'cannot apply the overrides {overrides} to a row\'s recipe: {e}') from None
  return config


def architecture(row: str) -> dict[str, Any]:
  """Our parameter count and MACs for a published row, measured by abstract tracing."""
  config = nfnet_configs.get_config(row)
  params, macs = _count(config.model.to_json(), config.data.eval_resolution)
  return dict(params_millions=params / 1e6, macs_billions=macs / 1e9,
              train_resolution=config.data.train_resolution, test_resolution=config.data.eval_resolution)


@functools.lru_cache(maxsize=None)
def _count(model_json: str, resolution: int) -> tuple[int, int]:
  """(parameters, MACs at `resolution`); cached because rows such as F5 and F5-sam share a model."""
  model_config = json.loads(model_json)
  return flops.model_param_count(model_config), flops.model_macs(model_config, resolution)


def checkpoint_paths(folder: str) -> tuple[list[epath.Path], list[str]]:
  """The candidate checkpoints in `folder` (.npz and .safetensors files, directories), and a line for each other
  entry."""
  root = epath.Path(folder).expanduser()
  if not root.is_dir():
    raise UserError(f'--checkpoints {folder} is not a folder')
  paths, skipped = [], []
  for entry in sorted(root.iterdir(), key=lambda p: p.name):
    if entry.is_dir() or entry.name.endswith(('.npz', '.safetensors')):
      paths.append(entry)
    else:
      skipped.append(f'{entry}: not a checkpoint (neither an .npz or .safetensors file nor a checkpoint directory)')
  if not paths:
    skipped.append(f'measured accuracy: no checkpoints in {root}')
  return paths, skipped


def evaluate_folder(folder: str, overrides: dict[str, Any], rows: Sequence[str]
                    ) -> tuple[Optional[dict[str, list[Measured]]], list[str]]:
  """Evaluates every checkpoint in `folder` that belongs to one of `rows`.

  Returns the results by row (None when the evaluation data is missing) and the skip lines. Checkpoints are
  read and evaluated one at a time, so memory holds one model's weights at once.
  """
  paths, skipped = checkpoint_paths(folder)
  if not paths:
    return {}, skipped
  # The data section is the same for every row (up to the resolution): check it before reading any weights.
  data_config = with_overrides(nfnet_configs.get_config(rows[0]), overrides).data
  try:
    sources.get_source(data_config, data_config.eval_split)
  except UserError as e:
    return None, skipped + [f'measured accuracy of the checkpoints in {folder}: {str(e).splitlines()[0]}']
  measured: dict[str, list[Measured]] = {}
  for path in paths:
    try:
      loaded = checkpoint.read(path)
    except UserError as e:
      skipped.append(f'{path}: {str(e).splitlines()[0]}')
      continue
    row, reason = nfnet_configs.published_row(loaded.model_config, loaded.config)
    if row is None or row not in rows:
      skipped.append(f'{path}: {reason or f"row {row} not asked for (--rows)"}')
      continue
    config = with_overrides(configs.for_model(loaded.model_config), overrides)
    results = evaluate.evaluate_weights(config, loaded.model_config, loaded.weight_sets)
    prefix = 'ema_' if 'ema_' in loaded.weight_sets else ''
    measured.setdefault(row, []).append(Measured(
        checkpoint=path.name, weights='ema' if prefix else 'raw', top1=100 * results[f'{prefix}top1'],
        top5=100 * results[f'{prefix}top5'], eval_resolution=config.data.eval_resolution,
        eval_examples=int(results['num_examples'])))
    del loaded
    sweeps.release_compiled_programs()  # a folder of F0-F6 would otherwise pass Linux's limit on mappings
  return measured, skipped


def table_rows(rows: Sequence[str], measured: dict[str, list[Measured]]) -> list[dict[str, Any]]:
  """One record per (published row, checkpoint), or per published row when it has no checkpoint."""
  records = []
  for row in rows:
    published = nfnet_configs.PUBLISHED[row]
    base = dict(row=row, **architecture(row),
                published_params_millions=published['params_millions'],
                published_macs_billions=published['macs_billions'],
                published_top1=published['top1'], published_top5=published['top5'])
    for result in measured.get(row) or [None]:
      records.append(dict(base, **(dataclasses.asdict(result) if result else {})))
  return records


def _number(value: Optional[float], digits: int, suffix: str = '') -> str:
  return '–' if value is None else f'{value:.{digits}f}{suffix}'


def markdown(records: Sequence[dict[str, Any]]) -> str:
  header = ('model', 'params (ours)', 'params (paper)', 'MACs (ours)', 'MACs (paper)', 'train / test res',
            'top-1 (paper)', 'top-5 (paper)', 'top-1 (ours)', 'top-5 (ours)', 'checkpoint (weights; evaluated on)')
  rows = []
  for r in records:
    if r.get('checkpoint'):
      source = f'{r["checkpoint"]} ({r["weights"]}; {r["eval_examples"]} images at {r["eval_resolution"]}²)'
    else:
      source = '–'
    rows.append([
        r['row'], _number(r['params_millions'], 2, 'M'), _number(r['published_params_millions'], 2, 'M'),
        _number(r['macs_billions'], 2, 'B'), _number(r['published_macs_billions'], 2, 'B'),
        f'{r["train_resolution"]} / {r["test_resolution"]}', _number(r['published_top1'], 1),
        _number(r['published_top5'], 1), _number(r.get('top1'), 2), _number(r.get('top5'), 2), source])
  return sweeps.markdown_table(header, rows)


def reproduce(rows: Sequence[str], checkpoints: Optional[str], overrides: dict[str, Any]
              ) -> tuple[list[dict[str, Any]], list[str]]:
  """The table's records and the skip lines."""
  unknown = [row for row in rows if row not in nfnet_configs.PUBLISHED]
  if unknown:
    raise ConfigError(f'unknown row {unknown[0]!r}; published rows: {", ".join(nfnet_configs.PUBLISHED)}')
  if not checkpoints:
    return table_rows(rows, {}), ['measured accuracy: no --checkpoints folder given']
  measured, skipped = evaluate_folder(checkpoints, overrides, rows)
  if measured is None:
    return table_rows(rows, {}), skipped
  skipped += [f'measured accuracy of {row}: no checkpoint of it in {checkpoints}'
              for row in rows if row not in measured]
  return table_rows(rows, measured), skipped


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if cli.config_given():
    raise ConfigError('--config: each row is evaluated with its own recipe (configs/nfnet.py:ROW); give only '
                      '--config.x=value overrides, which apply to every row')
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  records, skipped = reproduce(_ROWS.value, _CHECKPOINTS.value, overrides)
  table = markdown(records)
  print(table, end='')
  for line in skipped:
    print(f'skipped: {line}')
  if _OUT.value:
    out = epath.Path(_OUT.value).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / 'table.md').write_text(table)
    (out / 'table.csv').write_text(sweeps.csv_text(records, CSV_COLUMNS))
    print(f'wrote {out / "table.md"} and {out / "table.csv"}')


if __name__ == '__main__':
  cli.run(main)
