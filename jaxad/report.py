"""Aggregates a sweep: python -m jaxad.report SWEEP_DIR [--metric image_auroc] [--compare=A,B].

Reads `<SWEEP_DIR>/sweep.json` (written by jaxad.sweep) and every finished run's metrics.json (the mean
over categories; an unreadable one is skipped with a warning, a null or missing metric counts as NaN),
and writes into SWEEP_DIR:

- report.csv: per point the number of seeds and, per metric, the mean, the sample std (ddof=1) and the
  95 % confidence interval of the mean (Student t with n-1 degrees of freedom; NaN with n < 2).
- report_compare.csv: paired comparisons of the main metric between two points over the seeds both
  finished (`compare`): mean difference, paired t-test and a bootstrap 95 % interval of the difference.
  By default every point against the first one (the baseline); `--compare=A,B` names the pairs.
- report.md: both tables; report.png: the main metric (mean and 95 % interval) against the first swept
  field, one line per value of the others.
"""

import csv
import math
import os
import sys
import warnings

import numpy as np
import scipy.stats
from absl import app, flags

from jaxad import evaluate, writers

_METRIC = flags.DEFINE_string('metric', 'image_auroc', 'Main metric: bold in the table, plotted, compared.')
_COMPARE = flags.DEFINE_multi_string(
  'compare',
  [],
  'A,B: two point labels (the `point` column of report.csv) whose main metric is compared over matched '
  'seeds, as B - A; repeatable. Default: every point against the first.',
)

BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
COMPARE_COLUMNS = [
  'point_a',
  'point_b',
  'metric',
  'num_pairs',
  'mean_diff',
  't_stat',
  'p_value',
  'bootstrap_ci95_low',
  'bootstrap_ci95_high',
  'seeds_paired',
  'seeds_only_a',
  'seeds_only_b',
]


def collect(sweep_dir: str) -> tuple[dict, list[dict]]:
  """(sweep.json, one row per point: fields, seeds found, per-metric value lists over those seeds).

  Each row also has `by_seed`, {seed: {metric: value}}; `values[m][i]` belongs to `seeds[i]`.
  """
  sweep = writers.read_json(os.path.join(sweep_dir, 'sweep.json'))
  rows = {}
  for run in sweep['runs']:
    row = rows.setdefault(
      run['point'], {'point': run['point'], 'overrides': run['overrides'], 'seeds': [], 'by_seed': {}}
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
    row['by_seed'][run['seed']] = {k: float('nan') if v is None else float(v) for k, v in mean.items()}
  found = {m for r in rows.values() for v in r['by_seed'].values() for m in v}
  for r in rows.values():
    r['values'] = {m: [r['by_seed'][s].get(m, float('nan')) for s in r['seeds']] for m in sorted(found)}
  return sweep, list(rows.values())


def mean_std(values) -> tuple[float, float]:
  """Mean and sample std (ddof=1; NaN with fewer than 2 values) of `values`."""
  a = np.asarray(values, np.float64)
  if not len(a):
    return float('nan'), float('nan')
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float('nan')


def summary(values) -> tuple[float, float, float, float]:
  """(mean, sample std, 95 % CI low, high) of `values`.

  The interval is mean -/+ t_{0.975, n-1} * std / sqrt(n) (Student t, scipy.stats.t.ppf); NaN if n < 2.
  """
  mu, sd = mean_std(values)
  n = len(values)
  if n < 2:
    return mu, sd, float('nan'), float('nan')
  half = float(scipy.stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
  return mu, sd, mu - half, mu + half


def split_pair(text: str, labels: list[str]) -> tuple[str, str]:
  """The two point labels in `A,B`; labels contain commas, so the split is the one naming two points.

  Raises:
    ValueError: if no split, or more than one, names two of `labels`.
  """
  parts = text.split(',')
  known = set(labels)
  splits = [
    (a, b)
    for i in range(1, len(parts))
    if (a := ','.join(parts[:i])) in known and (b := ','.join(parts[i:])) in known
  ]
  if len(splits) != 1:
    what = 'is ambiguous' if splits else 'does not name two points'
    raise ValueError(f'--compare={text!r} {what}; points: {labels}')
  return splits[0]


def compare(row_a: dict, row_b: dict, metric: str) -> dict:
  """Paired comparison of `metric`, point b - point a, over the seeds both finished.

  Returns a dict with COMPARE_COLUMNS: the mean of the differences, scipy.stats.ttest_rel's t statistic
  and two-sided p-value, and the percentile bootstrap 95 % interval of the mean difference
  (scipy.stats.bootstrap on the per-seed differences, i.e. paired resampling, BOOTSTRAP_RESAMPLES
  resamples, random_state=np.random.default_rng(BOOTSTRAP_SEED)). t, p and the interval are NaN with
  fewer than 2 pairs or a non-finite value; seeds in one point only are listed, not used.
  """
  seeds_a, seeds_b = row_a['by_seed'], row_b['by_seed']
  paired = sorted(set(seeds_a) & set(seeds_b))
  a = np.asarray([seeds_a[s].get(metric, np.nan) for s in paired], np.float64)
  b = np.asarray([seeds_b[s].get(metric, np.nan) for s in paired], np.float64)
  d = b - a
  t = p = low = high = float('nan')
  if len(d) >= 2 and np.isfinite(d).all():
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', RuntimeWarning)  # Identical differences: t is +/-inf or NaN.
      t, p = (float(x) for x in scipy.stats.ttest_rel(b, a))
    if np.ptp(d) > 0:
      ci = scipy.stats.bootstrap(
        (d,),
        np.mean,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=0.95,
        method='percentile',
        random_state=np.random.default_rng(BOOTSTRAP_SEED),
      ).confidence_interval
      low, high = float(ci.low), float(ci.high)
    else:
      low = high = float(d[0])
  return {
    'point_a': row_a['point'],
    'point_b': row_b['point'],
    'metric': metric,
    'num_pairs': len(paired),
    'mean_diff': float(d.mean()) if len(d) else float('nan'),
    't_stat': t,
    'p_value': p,
    'bootstrap_ci95_low': low,
    'bootstrap_ci95_high': high,
    'seeds_paired': paired,
    'seeds_only_a': sorted(set(seeds_a) - set(seeds_b)),
    'seeds_only_b': sorted(set(seeds_b) - set(seeds_a)),
  }


def comparisons(rows: list[dict], metric: str, pairs=None) -> list[dict]:
  """`compare` for each (label a, label b) or 'A,B' in `pairs`; default every point against the first."""
  by_label = {r['point']: r for r in rows}
  if not pairs:
    pairs = [(rows[0]['point'], r['point']) for r in rows[1:]]
  pairs = [p if isinstance(p, (tuple, list)) else split_pair(p, list(by_label)) for p in pairs]
  for pair in pairs:
    for label in pair:
      if label not in by_label:
        raise ValueError(f'--compare: no point {label!r}; points: {list(by_label)}')
  return [compare(by_label[a], by_label[b], metric) for a, b in pairs]


def _seed_list(seeds) -> str:
  return ';'.join(str(s) for s in seeds)


def write_csv(path: str, fields: list[str], rows: list[dict], metrics: list[str]):
  """report.csv: point, fields, num_seeds, <m>_mean, <m>_std per metric, then <m>_ci95_low/high."""
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(
      [
        'point',
        *fields,
        'num_seeds',
        *(f'{m}_{s}' for m in metrics for s in ('mean', 'std')),
        *(f'{m}_{s}' for m in metrics for s in ('ci95_low', 'ci95_high')),
      ]
    )
    for r in rows:
      stats = {m: summary(r['values'][m]) for m in metrics}
      w.writerow(
        [
          r['point'],
          *(r['overrides'].get(k, '') for k in fields),
          len(r['seeds']),
          *(x for m in metrics for x in stats[m][:2]),
          *(x for m in metrics for x in stats[m][2:]),
        ]
      )


def write_compare_csv(path: str, results: list[dict]):
  """report_compare.csv: one row of COMPARE_COLUMNS per comparison; seed lists joined with ';'."""
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(COMPARE_COLUMNS)
    for c in results:
      w.writerow([_seed_list(c[k]) if k.startswith('seeds_') else c[k] for k in COMPARE_COLUMNS])


def _cell(mu: float, sd: float, low: float, high: float) -> str:
  if not np.isfinite(mu):
    return 'n/a'
  if not np.isfinite(sd):
    return f'{100 * mu:.1f}'
  ci = f' [{100 * low:.1f}, {100 * high:.1f}]' if np.isfinite(low) else ''
  return f'{100 * mu:.1f} ± {100 * sd:.1f}{ci}'


def markdown(fields: list[str], rows: list[dict], metrics: list[str], main_metric: str) -> str:
  """The per-point table: mean ± std [95 % CI] per metric, in percent."""
  names = [f'**{m}**' if m == main_metric else m for m in metrics]
  lines = [
    '| ' + ' | '.join([*fields, 'seeds', *names]) + ' |',
    '|' + '---|' * (len(fields) + 1 + len(metrics)),
  ]
  for r in rows:
    cells = [_cell(*summary(r['values'][m])) if r['seeds'] else '—' for m in metrics]
    lines.append(
      '| '
      + ' | '.join([*(str(r['overrides'].get(k, '')) for k in fields), str(len(r['seeds'])), *cells])
      + ' |'
    )
  return '\n'.join(lines)


def _num(x: float, fmt: str) -> str:
  return format(x, fmt) if np.isfinite(x) else 'n/a'


def compare_markdown(results: list[dict]) -> str:
  """The comparison table: B - A in percentage points, paired t-test, bootstrap interval, seeds."""
  lines = [
    '| A | B | pairs | B − A | t | p | bootstrap 95 % CI | unmatched seeds |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for c in results:
    low, high = c['bootstrap_ci95_low'], c['bootstrap_ci95_high']
    interval = f'[{100 * low:+.2f}, {100 * high:+.2f}]' if np.isfinite(low) else 'n/a'
    unmatched = '; '.join(
      f'only {side}: {", ".join(map(str, c[f"seeds_only_{side.lower()}"]))}'
      for side in ('A', 'B')
      if c[f'seeds_only_{side.lower()}']
    )
    mean_diff = c['mean_diff']
    lines.append(
      f'| {c["point_a"]} | {c["point_b"]} | {c["num_pairs"]} | {_num(100 * mean_diff, "+.2f")} | '
      f'{_num(c["t_stat"], ".3f")} | {_num(c["p_value"], ".3g")} | {interval} | {unmatched or "—"} |'
    )
  return '\n'.join(lines)


def plot(path: str, fields: list[str], rows: list[dict], metric: str):
  """`metric` (mean, 95 % CI error bars) against the first field; one line per combination of the others."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  x_field = fields[0] if fields else 'point'
  xs = list(dict.fromkeys(str(r['overrides'].get(x_field, r['point'])) for r in rows))
  lines = {}
  for r in rows:
    if r['seeds']:
      label = ', '.join(f'{k}={r["overrides"][k]}' for k in fields[1:] if k in r['overrides'])
      mu, _, low, high = summary(r['values'][metric])
      err = (0.0, 0.0) if np.isnan(low) else (mu - low, high - mu)
      lines.setdefault(label, []).append((xs.index(str(r['overrides'].get(x_field, r['point']))), mu, *err))
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, pts in lines.items():
    pos, mu, below, above = np.asarray(pts).T
    ax.errorbar(
      pos, 100 * mu, yerr=100 * np.stack([below, above]), marker='o', capsize=4, label=label or None
    )
  ax.set_xticks(range(len(xs)), xs)
  ax.set_xlabel(x_field)
  ax.set_ylabel(f'{metric} (%), mean and 95 % CI over seeds')
  if any(lines):
    ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(sweep_dir: str, main_metric: str = 'image_auroc', compare_pairs=None) -> str:
  """Writes report.md, report.csv, report_compare.csv and report.png into `sweep_dir`; returns the markdown.

  `compare_pairs`: (label a, label b) tuples or 'A,B' strings (see `comparisons`); default every point
  against the first.
  """
  sweep, rows = collect(sweep_dir)
  fields = sweep['fields']
  found = {m for r in rows for m in r['values']}
  metrics = [m for m in evaluate.METRIC_NAMES if m in found] + sorted(found - set(evaluate.METRIC_NAMES))
  if main_metric not in found:
    raise ValueError(f'No finished run reports {main_metric!r} (found: {sorted(found)}).')
  results = comparisons(rows, main_metric, compare_pairs)
  table = markdown(fields, rows, metrics, main_metric)
  text = (
    f'# Sweep {sweep["sweep"]} over {sweep["config"]}\n\n{table}\n\nMean ± sample std (ddof=1) '
    f"[95 % confidence interval of the mean, Student t] over seeds, in percent; each run's value is its "
    f'mean over categories.\n'
  )
  if results:
    text += (
      f'\n## Paired comparisons of {main_metric}\n\n{compare_markdown(results)}\n\nB − A in percentage '
      f'points over the seeds both points finished (unmatched seeds are not used); paired t-test '
      f'(scipy.stats.ttest_rel, two-sided); percentile bootstrap interval of the mean difference '
      f'({BOOTSTRAP_RESAMPLES} resamples of the per-seed differences, seed {BOOTSTRAP_SEED}).\n'
    )
  writers.atomic_write_text(os.path.join(sweep_dir, 'report.md'), text)
  write_csv(os.path.join(sweep_dir, 'report.csv'), fields, rows, metrics)
  write_compare_csv(os.path.join(sweep_dir, 'report_compare.csv'), results)
  plot(os.path.join(sweep_dir, 'report.png'), fields, rows, main_metric)
  return text


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Usage: python -m jaxad.report SWEEP_DIR [--metric NAME] [--compare=A,B ...]')
  print(report(argv[1], _METRIC.value, _COMPARE.value))


if __name__ == '__main__':
  app.run(main)
