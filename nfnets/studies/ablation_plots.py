"""Plots of an AGC ablation sweep (`nfnets.studies.ablation`), drawn with matplotlib's Agg backend into PNG files."""
import collections
import io
import math
from typing import Any, Sequence

from etils import epath

import matplotlib

matplotlib.use('Agg')  # files only; no display needed
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position

from nfnets.studies import ablation  # pylint: disable=g-import-not-at-top,wrong-import-position

_REFERENCE_STYLES = {'none': ('s', 'no clipping'), 'global_norm': ('D', 'global-norm clip')}


def _by_learning_rate(results: Sequence[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
  groups = collections.defaultdict(list)
  for r in results:
    groups[r['learning_rate']].append(r)
  return dict(sorted(groups.items()))


def _top1(result: dict[str, Any]) -> float:
  """Diverged runs that never finished evaluating are drawn at 0."""
  return 100 * (result['top1'] or 0.0)


def _save(figure, path: str | epath.PathLike) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=80)
  plt.close(figure)
  epath.Path(path).write_bytes(buffer.getvalue())


def plot_top1_vs_lambda(results: Sequence[dict[str, Any]], path: str | epath.PathLike) -> None:
  """Final top-1 against AGC's lambda (log scale), one line per batch size and one panel per learning rate.

  The unclipped and global-norm runs of each batch size are drawn as markers at the left edge, in the
  batch size's colour; diverged runs are marked with a cross, chance with a dotted line.
  """
  groups = _by_learning_rate(results)
  figure, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
  lambdas = sorted({r['clipping'] for r in results if r['mode'] == 'agc'}) or [1.0]
  left = lambdas[0] / 2.5  # where the reference markers stand, left of the smallest lambda
  batch_sizes = sorted({r['batch_size'] for r in results})
  colours = {b: f'C{i}' for i, b in enumerate(batch_sizes)}
  for ax, (learning_rate, runs) in zip(axes[0], groups.items()):
    for batch_size in batch_sizes:
      agc = sorted((r for r in runs if r['mode'] == 'agc' and r['batch_size'] == batch_size),
                   key=lambda r: r['clipping'])
      if agc:
        ax.plot([r['clipping'] for r in agc], [_top1(r) for r in agc], '-o', color=colours[batch_size],
                label=f'AGC, batch {batch_size}')
        for r in agc:
          if r['diverged']:
            ax.plot(r['clipping'], _top1(r), 'x', color='k', markersize=10)
      for mode, (marker, label) in _REFERENCE_STYLES.items():
        for r in (r for r in runs if r['mode'] == mode and r['batch_size'] == batch_size):
          ax.plot(left, _top1(r), marker, color=colours[batch_size], fillstyle='none', markersize=9,
                  label=f'{label}, batch {batch_size}' + (' (diverged)' if r['diverged'] else ''))
          if r['diverged']:
            ax.plot(left, _top1(r), 'x', color='k', markersize=10)
    chance = 100 / runs[0]['config']['model']['num_classes']
    ax.axhline(chance, color='grey', linestyle=':', linewidth=1, label='chance')
    ax.set_xscale('log')
    ax.set_xticks(lambdas, [f'{lam:g}' for lam in lambdas])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # log-scale minor labels collide over short ranges
    ax.set_xlabel('AGC λ (reference runs at the left edge)')
    ax.set_ylabel('final top-1 (%)')
    ax.set_ylim(-3, 103)
    ax.set_title(f'base learning rate {learning_rate:g}')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc='best')
  figure.tight_layout()
  _save(figure, path)


def plot_loss_curves(results: Sequence[dict[str, Any]], workdir: str | epath.PathLike,
                     path: str | epath.PathLike) -> None:
  """Training loss against step from each run's metrics.jsonl, one panel per (learning rate, batch size)."""
  panels = collections.defaultdict(list)
  for r in results:
    panels[(r['learning_rate'], r['batch_size'])].append(r)
  keys = sorted(panels)
  columns = min(3, len(keys))
  rows = math.ceil(len(keys) / columns)
  figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for r in panels[key]:
      metrics = [m for m in ablation.read_metrics(epath.Path(workdir) / r['name']) if 'train/loss' in m]
      # A non-finite loss is not drawn; a diverged run's line simply ends.
      steps = [m['step'] for m in metrics]
      # metrics.jsonl writes a non-finite loss as null; older files may hold NaN.
      losses = [math.nan if m['train/loss'] is None else m['train/loss'] for m in metrics]
      label = {'agc': f'AGC λ={r["clipping"]:g}', 'global_norm': f'global norm ≤ {r["clipping"]:g}'}.get(
          r['mode'], 'no clipping')
      line, = ax.plot(steps, losses, '-', label=label + (' (diverged)' if r['diverged'] else ''))
      finite = [(s, loss) for s, loss in zip(steps, losses) if math.isfinite(loss)]
      if r['diverged'] and finite:  # where a diverged run was last seen
        ax.plot(*finite[-1], 'x', color=line.get_color(), markersize=10)
    ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.set_ylabel('training loss')
    ax.set_title(f'base lr {key[0]:g}, batch {key[1]}')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(keys):]:
    ax.set_visible(False)
  figure.tight_layout()
  _save(figure, path)


def write_plots(results: Sequence[dict[str, Any]], workdir: str | epath.PathLike) -> list[epath.Path]:
  """`top1_vs_lambda.png` and `loss_curves.png` in `workdir`; returns their paths."""
  paths = [epath.Path(workdir) / 'top1_vs_lambda.png', epath.Path(workdir) / 'loss_curves.png']
  plot_top1_vs_lambda(results, paths[0])
  plot_loss_curves(results, workdir, paths[1])
  return paths
