"""Aggregates a sweep: python -m jaxad.report SWEEP_DIR [--metric image_auroc].

Reads `<SWEEP_DIR>/sweep.json` (written by jaxad.sweep) and every finished run's metrics.json (the mean
over categories; an unreadable one is skipped with a warning, a null metric counts as NaN), and writes
report.md, report.csv (mean and sample std, ddof=1, over seeds per point) and report.png (the main
metric against the first swept field, one line per value of the others).
"""

import csv
import os
import sys

import numpy as np
from absl import app, flags

from jaxad import evaluate, writers

_METRIC = flags.DEFINE_string('metric', 'image_auroc', 'Main metric: bold in the table, plotted.')


def collect(sweep_dir: str) -> tuple[dict, list[dict]]:
  """(sweep.json, one row per point: fields, seeds found, and per-metric value lists over seeds)."""
  sweep = writers.read_json(os.path.join(sweep_dir, 'sweep.json'))
  rows = {}
  for run in sweep['runs']:
    row = rows.setdefault(
      run['point'], {'point': run['point'], 'overrides': run['overrides'], 'seeds': [], 'values': {}}
    )
    path = os.path.join(sweep_dir, run['dir'], 'metrics.json')
    if not os.path.exists(path):
      continue
    try:
      mean = writers.read_metrics(path)['mean']
    except ValueError as e:
      print(f'Warning: skipping {e}', file=sys.stderr)
      continue
    row['seeds'].append(run['seed'])
    for k, v in mean.items():
      row['values'].setdefault(k, []).append(float('nan') if v is None else v)
  return sweep, list(rows.values())


def mean_std(values) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float('nan')


def write_csv(path: str, fields: list[str], rows: list[dict], metrics: list[str]):
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['point', *fields, 'num_seeds', *(f'{m}_{s}' for m in metrics for s in ('mean', 'std'))])
    for r in rows:
      stats = (
        [x for m in metrics for x in mean_std(r['values'][m])]
        if r['seeds']
        else [float('nan')] * 2 * len(metrics)
      )
      w.writerow([r['point'], *(r['overrides'].get(k, '') for k in fields), len(r['seeds']), *stats])


def markdown(fields: list[str], rows: list[dict], metrics: list[str], main_metric: str) -> str:
  names = [f'**{m}**' if m == main_metric else m for m in metrics]
  lines = [
    '| ' + ' | '.join([*fields, 'seeds', *names]) + ' |',
    '|' + '---|' * (len(fields) + 1 + len(metrics)),
  ]
  for r in rows:
    cells = []
    for m in metrics:
      if not r['seeds']:
        cells.append('—')
        continue
      mu, sd = mean_std(r['values'][m])
      cells.append(
        'n/a'
        if not np.isfinite(mu)
        else f'{100 * mu:.1f} ± {100 * sd:.1f}'
        if np.isfinite(sd)
        else f'{100 * mu:.1f}'
      )
    lines.append(
      '| '
      + ' | '.join([*(str(r['overrides'].get(k, '')) for k in fields), str(len(r['seeds'])), *cells])
      + ' |'
    )
  return '\n'.join(lines)


def plot(path: str, fields: list[str], rows: list[dict], metric: str):
  """`metric` (mean +/- std) against the first field; one line per combination of the other fields."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  x_field = fields[0] if fields else 'point'
  xs = list(dict.fromkeys(str(r['overrides'].get(x_field, r['point'])) for r in rows))
  lines = {}
  for r in rows:
    if r['seeds']:
      label = ', '.join(f'{k}={r["overrides"][k]}' for k in fields[1:] if k in r['overrides'])
      mu, sd = mean_std(r['values'][metric])
      lines.setdefault(label, []).append(
        (xs.index(str(r['overrides'].get(x_field, r['point']))), mu, 0.0 if np.isnan(sd) else sd)
      )
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, pts in lines.items():
    pos, mu, sd = np.asarray(pts).T
    ax.errorbar(pos, 100 * mu, yerr=100 * sd, marker='o', capsize=4, label=label or None)
  ax.set_xticks(range(len(xs)), xs)
  ax.set_xlabel(x_field)
  ax.set_ylabel(f'{metric} (%), mean ± std over seeds')
  if any(lines):
    ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(sweep_dir: str, main_metric: str = 'image_auroc') -> str:
  """Writes report.md, report.csv and report.png into `sweep_dir`; returns the markdown."""
  sweep, rows = collect(sweep_dir)
  fields = sweep['fields']
  found = {m for r in rows for m in r['values']}
  metrics = [m for m in evaluate.METRIC_NAMES if m in found] + sorted(found - set(evaluate.METRIC_NAMES))
  if main_metric not in found:
    raise ValueError(f'No finished run reports {main_metric!r} (found: {sorted(found)}).')
  table = markdown(fields, rows, metrics, main_metric)
  text = (
    f'# Sweep {sweep["sweep"]} over {sweep["config"]}\n\n{table}\n\nMean ± sample std (ddof=1) '
    f"over seeds, in percent; each run's value is its mean over categories.\n"
  )
  writers.atomic_write_text(os.path.join(sweep_dir, 'report.md'), text)
  write_csv(os.path.join(sweep_dir, 'report.csv'), fields, rows, metrics)
  plot(os.path.join(sweep_dir, 'report.png'), fields, rows, main_metric)
  return text


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Usage: python -m jaxad.report SWEEP_DIR [--metric NAME]')
  print(report(argv[1], _METRIC.value))


if __name__ == '__main__':
  app.run(main)
