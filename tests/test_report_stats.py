"""jaxad.report statistics on a fake sweep: 95 % CIs, paired t-tests and bootstrap intervals vs scipy."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
from conftest import REPO

from jaxad import report

_POINTS = {  # label -> (overrides, image_auroc per seed 0..4; None: the run did not finish).
  'lr=0.1,wd=0': ({'lr': 0.1, 'wd': 0}, [0.81, 0.84, 0.79, 0.86, 0.83]),
  'lr=0.1,wd=1': ({'lr': 0.1, 'wd': 1}, [0.85, 0.86, None, 0.90, 0.84]),
  'lr=0.2,wd=0': ({'lr': 0.2, 'wd': 0}, [0.70, 0.75, 0.72, 0.71, None]),
}
_SEEDS = 5


def _pixel(point: int, seed: int) -> float:
  return 0.9 + 0.01 * point - 0.003 * seed**2


def _fake_sweep(workdir) -> None:
  """sweep.json and per-run metrics.json in jaxad.sweep's layout: <point>/seed_<s>/metrics.json."""
  runs = []
  for i, (label, (overrides, values)) in enumerate(_POINTS.items()):
    for seed, value in enumerate(values):
      run = {'point': label, 'overrides': overrides, 'seed': seed, 'dir': f'{label}/seed_{seed}'}
      runs.append(run)
      (workdir / run['dir']).mkdir(parents=True)
      if value is not None:
        mean = {'image_auroc': value, 'pixel_auroc': _pixel(i, seed)}
        (workdir / run['dir'] / 'metrics.json').write_text(json.dumps({'model': 'x', 'mean': mean}))
  sweep = {
    'config': 'c.py',
    'sweep': 's.py',
    'seeds': _SEEDS,
    'base': {},
    'fields': ['lr', 'wd'],
    'runs': runs,
  }
  (workdir / 'sweep.json').write_text(json.dumps(sweep))


def _finished(workdir, label: str, metric: str) -> dict:
  """{seed: value} read back from the metrics.json files of `label`."""
  out = {}
  for seed in range(_SEEDS):
    path = workdir / label / f'seed_{seed}' / 'metrics.json'
    if path.exists():
      out[seed] = json.loads(path.read_text())['mean'][metric]
  return out


def _read_csv(path) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def test_report_csv_confidence_intervals_equal_scipy(tmp_path):
  _fake_sweep(tmp_path)
  text = report.report(str(tmp_path))
  rows = _read_csv(tmp_path / 'report.csv')
  with open(tmp_path / 'report.csv') as f:
    header = next(csv.reader(f))
  metrics = ['image_auroc', 'pixel_auroc']
  old = ['point', 'lr', 'wd', 'num_seeds', *(f'{m}_{s}' for m in metrics for s in ('mean', 'std'))]
  assert header == [*old, *(f'{m}_{s}' for m in metrics for s in ('ci95_low', 'ci95_high'))]
  assert [r['point'] for r in rows] == list(_POINTS)
  for row in rows:
    for metric in metrics:
      values = np.array(list(_finished(tmp_path, row['point'], metric).values()))
      n = len(values)
      assert int(row['num_seeds']) == n
      half = scipy.stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
      np.testing.assert_allclose(float(row[f'{metric}_mean']), values.mean(), rtol=1e-12)
      np.testing.assert_allclose(float(row[f'{metric}_std']), np.std(values, ddof=1), rtol=1e-12)
      np.testing.assert_allclose(float(row[f'{metric}_ci95_low']), values.mean() - half, rtol=1e-12)
      np.testing.assert_allclose(float(row[f'{metric}_ci95_high']), values.mean() + half, rtol=1e-12)
      # The same interval as scipy's own t interval of the mean.
      low, high = scipy.stats.t.interval(0.95, n - 1, loc=values.mean(), scale=scipy.stats.sem(values))
      np.testing.assert_allclose(
        [float(row[f'{metric}_ci95_low']), float(row[f'{metric}_ci95_high'])], [low, high]
      )
  first = np.array(_POINTS['lr=0.1,wd=0'][1])
  lo, hi = scipy.stats.t.interval(0.95, 4, loc=first.mean(), scale=scipy.stats.sem(first))
  cell = f'{100 * first.mean():.1f} ± {100 * first.std(ddof=1):.1f} [{100 * lo:.1f}, {100 * hi:.1f}]'
  assert f'| 0.1 | 0 | 5 | {cell} |' in text
  assert (tmp_path / 'report.png').stat().st_size > 0


def test_report_ci_is_nan_with_one_seed():
  assert all(math.isnan(x) for x in report.summary([0.5])[1:])
  mu, sd, low, high = report.summary([0.5, 0.7])
  assert (mu, low < mu < high) == (0.6, True)
  assert high - low == pytest.approx(2 * scipy.stats.t.ppf(0.975, 1) * sd / math.sqrt(2))


def test_report_paired_comparisons_equal_scipy_over_matched_seeds(tmp_path):
  _fake_sweep(tmp_path)
  text = report.report(str(tmp_path))
  rows = _read_csv(tmp_path / 'report_compare.csv')
  assert rows[0].keys() == set(report.COMPARE_COLUMNS)
  baseline = 'lr=0.1,wd=0'
  assert [(r['point_a'], r['point_b'], r['metric']) for r in rows] == [
    (baseline, 'lr=0.1,wd=1', 'image_auroc'),
    (baseline, 'lr=0.2,wd=0', 'image_auroc'),
  ]
  a = _finished(tmp_path, baseline, 'image_auroc')
  for row, only_a in zip(rows, ['2', '4']):
    b = _finished(tmp_path, row['point_b'], 'image_auroc')
    seeds = sorted(set(a) & set(b))
    assert len(seeds) == 4 and int(row['num_pairs']) == 4
    assert row['seeds_paired'] == ';'.join(map(str, seeds))
    assert (row['seeds_only_a'], row['seeds_only_b']) == (only_a, '')
    xa, xb = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    t, p = scipy.stats.ttest_rel(xb, xa)
    np.testing.assert_allclose(float(row['mean_diff']), np.mean(xb - xa), rtol=1e-12)
    np.testing.assert_allclose([float(row['t_stat']), float(row['p_value'])], [t, p], rtol=1e-10)
    low, high = float(row['bootstrap_ci95_low']), float(row['bootstrap_ci95_high'])
    assert low <= float(row['mean_diff']) <= high
    ci = scipy.stats.bootstrap(
      (xb - xa,),
      np.mean,
      n_resamples=9999,
      method='percentile',
      random_state=np.random.default_rng(0),
    ).confidence_interval
    np.testing.assert_allclose([low, high], [ci.low, ci.high], rtol=1e-12)
  assert '## Paired comparisons of image_auroc' in text
  assert f'| {baseline} | lr=0.1,wd=1 | 4 |' in text and '| only A: 2 |' in text

  first = (tmp_path / 'report_compare.csv').read_text()
  report.report(str(tmp_path))
  assert (tmp_path / 'report_compare.csv').read_text() == first  # The bootstrap is seeded.


def test_report_unmatched_seeds_are_listed_not_paired(tmp_path):
  _fake_sweep(tmp_path)
  _, rows = report.collect(str(tmp_path))
  by_label = {r['point']: r for r in rows}
  (result,) = report.comparisons(rows, 'image_auroc', [('lr=0.1,wd=1', 'lr=0.2,wd=0')])
  assert result['seeds_paired'] == [0, 1, 3]
  assert (result['seeds_only_a'], result['seeds_only_b']) == ([4], [2])
  a, b = (by_label[k]['by_seed'] for k in ('lr=0.1,wd=1', 'lr=0.2,wd=0'))
  xa, xb = (np.array([x[s]['image_auroc'] for s in (0, 1, 3)]) for x in (a, b))
  np.testing.assert_allclose(result['t_stat'], scipy.stats.ttest_rel(xb, xa).statistic, rtol=1e-10)
  (single,) = report.comparisons(rows, 'image_auroc', ['lr=0.1,wd=0,lr=0.1,wd=0'])
  assert single['mean_diff'] == 0 and math.isnan(single['t_stat'])
  assert single['bootstrap_ci95_low'] == single['bootstrap_ci95_high'] == 0


def test_compare_labels_with_commas():
  labels = ['a=1,b=2', 'a=2,b=2', 'a=1', 'b=2,c=3', 'c=3']
  assert report.split_pair('a=1,b=2,a=2,b=2', labels) == ('a=1,b=2', 'a=2,b=2')
  with pytest.raises(ValueError, match='ambiguous'):
    report.split_pair('a=1,b=2,c=3', labels)  # a=1 | b=2,c=3 and a=1,b=2 | c=3.
  with pytest.raises(ValueError, match='does not name two points'):
    report.split_pair('a=3,b=2', labels)


def test_report_cli_compare_flag(tmp_path):
  _fake_sweep(tmp_path)
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'jaxad.report',
      str(tmp_path),
      '--metric=pixel_auroc',
      '--compare=lr=0.2,wd=0,lr=0.1,wd=1',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = _read_csv(tmp_path / 'report_compare.csv')
  assert (row['point_a'], row['point_b'], row['metric'], row['num_pairs']) == (
    'lr=0.2,wd=0',
    'lr=0.1,wd=1',
    'pixel_auroc',
    '3',
  )
  assert (row['seeds_only_a'], row['seeds_only_b']) == ('2', '4')
  assert '| lr=0.2,wd=0 | lr=0.1,wd=1 | 3 |' in result.stdout
