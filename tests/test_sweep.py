"""jaxad.sweep and jaxad.report: a 2x2 mean-image sweep x 2 seeds, rerun skips, report vs numpy, run slots."""

import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from jaxad import sweep

_SWEEP = """
from jaxad.sweep import grid


def get_sweep(arg=None):
  return grid({'mean_image.smoothing_sigma': [1.0, 3.0], 'augment.hflip': [False, True]})
"""


def _sweep_cmd(sweep_file, workdir, root, *extra):
  return [
    sys.executable,
    '-m',
    'jaxad.sweep',
    '--config',
    str(REPO / 'configs' / 'mean_image.py'),
    '--sweep',
    str(sweep_file),
    '--workdir',
    str(workdir),
    '--seeds',
    '2',
    '--override',
    'dataset.name=folder',
    '--override',
    f'dataset.root={root}',
    '--override',
    'dataset.categories=weave',
    '--override',
    'dataset.image_size=32',
    '--override',
    'batch_size=4',
    '--override',
    'eval_batch_size=10',
    '--override',
    'num_heatmaps=0',
    *extra,
  ]


def test_local_sweep_rerun_and_report(tiny_dataset, tmp_path):
  sweep_file = tmp_path / 'grid.py'
  sweep_file.write_text(_SWEEP)
  workdir = tmp_path / 'sweep'
  cmd = _sweep_cmd(sweep_file, workdir, tiny_dataset)
  first = subprocess.run([*cmd, '--parallel', '2'], capture_output=True, text=True, cwd=REPO, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  runs = sorted(workdir.glob('*/seed_*/metrics.json'))
  assert len(runs) == 8
  assert (workdir / 'mean_image.smoothing_sigma=3.0,augment.hflip=True' / 'seed_1' / 'metrics.json') in runs
  stamps = [p.stat().st_mtime_ns for p in runs]
  header = (runs[0].parent / 'output.log').read_text().splitlines()[0]  # Two runs share the devices.
  assert ' in slot ' in header and 'MEM_FRACTION=0.45 XLA_PYTHON_CLIENT_PREALLOCATE=false' in header, header

  again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert again.returncode == 0 and '8 finished, 0 to run' in again.stderr, again.stderr[-3000:]
  assert [p.stat().st_mtime_ns for p in runs] == stamps

  # Unfinished runs (no metrics.json, or one cut short) are resumed from their checkpoints, not retrained.
  unfinished, truncated = runs[0], runs[1]
  unfinished.unlink()
  truncated.write_text(truncated.read_text()[:40])
  printed = subprocess.run([*cmd, '--executor', 'print'], capture_output=True, text=True, cwd=REPO)
  assert printed.stdout.count('jaxad.main') == 2, printed.stdout
  assert str(unfinished.parent) in printed.stdout and str(truncated.parent) in printed.stdout
  resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert resumed.returncode == 0 and '6 finished, 2 to run' in resumed.stderr, resumed.stderr[-3000:]
  for path in (unfinished, truncated):
    assert 'Resumed from step 3' in (path.parent / 'output.log').read_text()
    assert 'mean' in json.loads(path.read_text())

  report = subprocess.run(
    [sys.executable, '-m', 'jaxad.report', str(workdir)],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert report.returncode == 0, report.stderr[-3000:]
  with open(workdir / 'report.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4
  stds = []
  for row in rows:
    values = {k: [] for k in ('image_auroc', 'pixel_auroc', 'aupro')}
    for seed in (0, 1):
      mean = json.loads((workdir / row['point'] / f'seed_{seed}' / 'metrics.json').read_text())['mean']
      for k in values:
        values[k].append(mean[k])
    assert row['num_seeds'] == '2'
    for k, v in values.items():
      np.testing.assert_allclose(float(row[f'{k}_mean']), np.mean(v), rtol=1e-12)
      np.testing.assert_allclose(float(row[f'{k}_std']), np.std(v, ddof=1), rtol=1e-9, atol=1e-15)
      stds.append(np.std(v, ddof=1))
  assert max(stds) > 0  # Seeds change the flips, so the report has real spread to check.
  assert '| mean_image.smoothing_sigma | augment.hflip | seeds |' in report.stdout
  assert Image.open(workdir / 'report.png').size[0] > 300


def _fake_sweep(workdir, metrics_texts: list[str]):
  """A sweep.json over one point with one seed per metrics.json text (None: the run has none)."""
  runs = [
    {'point': 'a=1', 'overrides': {'a': 1}, 'seed': s, 'dir': f'a=1/seed_{s}'}
    for s in range(len(metrics_texts))
  ]
  (workdir / 'sweep.json').write_text(
    json.dumps({'config': 'c.py', 'sweep': 's.py', 'seeds': len(runs), 'fields': ['a'], 'runs': runs})
  )
  for run, text in zip(runs, metrics_texts):
    (workdir / run['dir']).mkdir(parents=True)
    if text is not None:
      (workdir / run['dir'] / 'metrics.json').write_text(text)


def test_report_skips_unreadable_metrics(tmp_path, capsys):
  from jaxad import report

  good = {'mean': {'image_auroc': 0.5, 'pixel_auroc': None}}
  _fake_sweep(tmp_path, [json.dumps(good), json.dumps(good)[:20], '', json.dumps({'model': 'x'}), None])
  text = report.report(str(tmp_path))
  err = capsys.readouterr().err
  for seed in (1, 2, 3):
    assert f'Warning: skipping {tmp_path}/a=1/seed_{seed}/metrics.json: unreadable' in err
  assert 'seed_0' not in err and 'seed_4' not in err
  assert '| 1 | 1 | 50.0 | n/a |' in text
  with open(tmp_path / 'report.csv') as f:
    (row,) = csv.DictReader(f)
  assert row['num_seeds'] == '1' and float(row['image_auroc_mean']) == 0.5


def test_sweep_treats_incomplete_metrics_as_unfinished(tmp_path):
  run = {'workdir': str(tmp_path)}
  assert not sweep.finished(run)
  for text in ['', '{"model": "x", "mean": {"image_au', '{"model": "x"}', 'null']:
    (tmp_path / 'metrics.json').write_text(text)
    assert not sweep.finished(run), text
  (tmp_path / 'metrics.json').write_text('{"mean": {"image_auroc": NaN}}')  # Written before null was used.
  assert sweep.finished(run)


def test_grid_and_point_names():
  points = sweep.grid({'a.b': [1, 2], 'c': ['x', 'y z']})
  assert points == [
    {'a.b': 1, 'c': 'x'},
    {'a.b': 1, 'c': 'y z'},
    {'a.b': 2, 'c': 'x'},
    {'a.b': 2, 'c': 'y z'},
  ]
  assert [sweep.point_name(p) for p in points[:2]] == ['a.b=1,c=x', 'a.b=1,c=y_z']
  runs = sweep.plan('configs/x.py:v', points[:1], 2, 'sw', {'dataset.root': '/d'})
  assert [r['workdir'] for r in runs] == ['sw/a.b=1,c=x/seed_0', 'sw/a.b=1,c=x/seed_1']
  assert runs[1]['args'][-4:] == [
    '--config.dataset.root=/d',
    '--config.a.b=1',
    '--config.c=x',
    '--config.seed=1',
  ]


@pytest.mark.parametrize('path', sorted((REPO / 'configs' / 'sweeps').glob('*.py')))
def test_shipped_sweeps_name_real_config_fields(path):
  """Every sweep file configs/sweeps/<model>_<what>.py names fields that configs/<model>.py has."""
  model = max(
    (p.stem for p in (REPO / 'configs').glob('*.py') if path.stem.startswith(p.stem + '_')), key=len
  )
  spec = importlib.util.spec_from_file_location(model, REPO / 'configs' / f'{model}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  points = sweep._load(str(path), 'get_sweep')
  assert len(points) >= 2
  for p in points:
    sweep.check_fields(module.get_config(), p, str(path))


# Appends this attempt's device variables to <workdir>/env.jsonl, waits (up to 60 s) until every run in
# $RUNS has started so the runs overlap, exits preempted on the first attempt of a run in $PREEMPT, and
# writes a metrics.json.
_ENV_PROBE = """
import json, os, sys, time
workdir = sys.argv[1]
keys = ('CUDA_VISIBLE_DEVICES', 'XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION')
path = os.path.join(workdir, 'env.jsonl')
first = not os.path.exists(path)
with open(path, 'a') as f:
  f.write(json.dumps({k: os.environ.get(k) for k in keys}) + '\\n')
deadline = time.time() + 60
while time.time() < deadline and not all(
  os.path.exists(os.path.join(w, 'env.jsonl')) for w in os.environ['RUNS'].split(os.pathsep)
):
  time.sleep(0.02)
if first and os.path.basename(workdir) in os.environ.get('PREEMPT', '').split(','):
  sys.exit(75)
json.dump({'mean': {'image_auroc': 1.0}}, open(os.path.join(workdir, 'metrics.json'), 'w'))
"""


def _probe_runs(tmp_path, monkeypatch, n: int, preempt: str = '') -> tuple[str, list[dict]]:
  script = tmp_path / 'probe.py'
  script.write_text(_ENV_PROBE)
  runs = [{'workdir': str(tmp_path / f'run{i}'), 'args': [str(tmp_path / f'run{i}')]} for i in range(n)]
  monkeypatch.setenv('RUNS', os.pathsep.join(r['workdir'] for r in runs))
  monkeypatch.setenv('PREEMPT', preempt)
  for k in ('CUDA_VISIBLE_DEVICES', 'XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION'):
    monkeypatch.delenv(k, raising=False)
  return str(script), runs


def _envs(run: dict) -> list[dict]:
  with open(os.path.join(run['workdir'], 'env.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_parallel_runs_get_disjoint_devices_and_keep_them_when_resumed(tmp_path, monkeypatch):
  script, runs = _probe_runs(tmp_path, monkeypatch, 2, preempt='run0')
  executor = sweep.LocalExecutor(
    max_resumes=1, command=(sys.executable, script), devices=['0', '1', '2', '3'], devices_per_run=2
  )
  assert executor.run_all(runs, parallel=2) == [0, 0]
  first, second = (_envs(r) for r in runs)
  assert len(first) == 2 and len(second) == 1  # run0 was preempted once and rerun.
  assert first[0] == first[1]  # The rerun keeps its slot's devices.
  assert {first[0]['CUDA_VISIBLE_DEVICES'], second[0]['CUDA_VISIBLE_DEVICES']} == {'0,1', '2,3'}
  for env in (first[0], second[0]):
    assert env['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'false' and env['XLA_PYTHON_CLIENT_MEM_FRACTION'] is None
  for run, env in zip(runs, (first[0], second[0])):
    header = (pathlib.Path(run['workdir']) / 'output.log').read_text().splitlines()[0]
    assert header.startswith(f'[jaxad.sweep] Run {run["workdir"]} in slot ')
    assert f'CUDA_VISIBLE_DEVICES={env["CUDA_VISIBLE_DEVICES"]} ' in header
    assert header.endswith('XLA_PYTHON_CLIENT_PREALLOCATE=false')


@pytest.mark.parametrize('devices', [['0'], []])
def test_parallel_runs_share_too_few_devices_without_preallocating(tmp_path, monkeypatch, capsys, devices):
  script, runs = _probe_runs(tmp_path, monkeypatch, 2)
  executor = sweep.LocalExecutor(
    max_resumes=0, command=(sys.executable, script), devices=devices, devices_per_run=1
  )
  assert executor.run_all(runs, parallel=2) == [0, 0]
  assert 'the runs share them' in capsys.readouterr().err
  for run in runs:
    (env,) = _envs(run)
    assert env == {
      'CUDA_VISIBLE_DEVICES': None,
      'XLA_PYTHON_CLIENT_PREALLOCATE': 'false',
      'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.45',
    }
    header = (pathlib.Path(run['workdir']) / 'output.log').read_text().splitlines()[0]
    assert header.endswith(
      'XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 XLA_PYTHON_CLIENT_PREALLOCATE=false '
      'CUDA_VISIBLE_DEVICES=unset (inherited)'
    )


def test_run_local_passes_devices_on(tmp_path, monkeypatch):
  script, runs = _probe_runs(tmp_path, monkeypatch, 2)
  for run in runs:
    run['args'] = [script, *run['args']]
  sweep.run_local(runs, parallel=2, max_resumes=0, devices=['3', '5'], devices_per_run=1)
  assert sorted(_envs(r)[0]['CUDA_VISIBLE_DEVICES'] for r in runs) == ['3', '5']


def test_slot_environments():
  assert sweep.slot_environments(1, ['0', '1'], 0) == [{}]
  assert sweep.slot_environments(1, ['0', '1'], 2) == [{'CUDA_VISIBLE_DEVICES': '0,1'}]
  shared = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.3'}
  assert sweep.slot_environments(3, ['0', '1', '2'], 0) == [shared] * 3  # 0: no partitioning.
  assert sweep.slot_environments(3, ['0', '1', '2', '3', '4'], 2) == [shared] * 3
  assert [e['CUDA_VISIBLE_DEVICES'] for e in sweep.slot_environments(3, list('abcdefg'), 2)] == [
    'a,b',
    'c,d',
    'e,f',
  ]


def test_visible_devices_from_the_environment_or_nvidia_smi(tmp_path, monkeypatch):
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '2, 3,')
  assert sweep.visible_devices() == ['2', '3']
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
  assert sweep.visible_devices() == []
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  smi = bin_dir / 'nvidia-smi'
  smi.write_text(
    '#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-a)"\necho "GPU 1: NVIDIA H200 (UUID: GPU-b)"\n'
  )
  smi.chmod(0o755)
  monkeypatch.setenv('PATH', str(bin_dir))
  assert sweep.visible_devices() == ['0', '1']
  smi.write_text('#!/bin/sh\nexit 9\n')
  assert sweep.visible_devices() == []
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  assert sweep.visible_devices() == []
