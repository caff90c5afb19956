"""Run outputs: atomic strict-JSON writes, null for undefined metrics, and exit code 75 (preempted)."""

import json
import os
import signal
import subprocess
import textwrap
import threading
import time

import ml_collections
import numpy as np
import pytest
from conftest import REPO

import jaxad
from jaxad import evaluate, sweep, writers


def _strict_loads(text: str):
  """json.loads that rejects the NaN/Infinity tokens Python's json accepts by default."""

  def reject(token):
    raise ValueError(f'not strict JSON: {token}')

  return json.loads(text, parse_constant=reject)


def _leftovers(directory) -> list[str]:
  return [p.name for p in directory.iterdir() if p.name.endswith('.tmp')]


def test_json_safe_turns_non_finite_floats_into_none():
  obj = {
    'a': float('nan'),
    'b': [np.float32(np.inf), np.float64(0.25), (1, -np.inf)],
    'c': {'d': np.array([0.5, np.nan]), 'e': np.int64(3), 'f': np.bool_(True)},
    'g': 'text',
  }
  assert writers.json_safe(obj) == {
    'a': None,
    'b': [None, 0.25, [1, None]],
    'c': {'d': [0.5, None], 'e': 3, 'f': True},
    'g': 'text',
  }
  assert _strict_loads(writers.dumps_json(obj))['b'] == [None, 0.25, [1, None]]


def test_atomic_write_json_writes_strict_json(tmp_path):
  path = tmp_path / 'metrics.json'
  writers.atomic_write_json(str(path), {'mean': {'x': np.float64(np.nan), 'y': 0.5}})
  assert _strict_loads(path.read_text()) == {'mean': {'x': None, 'y': 0.5}}
  writers.atomic_write_json(str(path), {'mean': {'y': 0.75}})
  assert _strict_loads(path.read_text()) == {'mean': {'y': 0.75}}
  assert _leftovers(tmp_path) == []


def test_atomic_write_json_keeps_the_old_file_if_the_object_does_not_serialise(tmp_path):
  path = tmp_path / 'config.json'
  writers.atomic_write_json(str(path), {'old': 1})
  before = path.read_text()
  with pytest.raises(TypeError, match='config.json'):
    writers.atomic_write_json(str(path), {'new': object()})
  assert path.read_text() == before
  assert _leftovers(tmp_path) == []


@pytest.mark.parametrize('failing', ['fsync', 'replace'])
def test_atomic_write_keeps_the_old_file_if_writing_fails_midway(tmp_path, monkeypatch, failing):
  path = tmp_path / 'metrics.json'
  writers.atomic_write_json(str(path), {'mean': {'old': 1.0}})
  before = path.read_text()

  def fail(*args):
    raise OSError('disk gone')

  monkeypatch.setattr(os, failing, fail)
  with pytest.raises(OSError, match=r'metrics\.json.*disk gone'):
    writers.atomic_write_json(str(path), {'mean': {'new': 2.0}})
  monkeypatch.undo()
  assert path.read_text() == before
  assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
  'text', ['', '{"model": "x", "categories": {}, "me', '{"model": "x"}', '[1, 2]', '{"mean": 3}']
)
def test_read_metrics_rejects_incomplete_files(tmp_path, text):
  path = tmp_path / 'metrics.json'
  path.write_text(text)
  with pytest.raises(ValueError, match='metrics.json'):
    writers.read_metrics(str(path))
  assert not sweep.finished({'workdir': str(tmp_path)})


def test_write_results_writes_undefined_metrics_as_null(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(evaluate.logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  config = ml_collections.ConfigDict(
    {'model': {'name': 'mean_image'}, 'dataset': {'name': 'folder', 'root': '/data'}}
  )
  per_category = {
    'good_only': {'image_auroc': np.float64(np.nan), 'pixel_auroc': float('nan'), 'aupro': 0.5},
    'weave': {'image_auroc': 0.75, 'pixel_auroc': np.float32(0.5), 'aupro': float('inf')},
  }
  mean = evaluate.write_results(str(tmp_path), per_category, config, provenance={'seed': np.int64(0)})
  assert mean['image_auroc'] == 0.75
  saved = _strict_loads((tmp_path / 'metrics.json').read_text())
  assert saved['categories']['good_only'] == {'image_auroc': None, 'pixel_auroc': None, 'aupro': 0.5}
  assert saved['categories']['weave']['aupro'] is None
  assert saved['mean'] == {'aupro': None, 'image_auroc': 0.75, 'pixel_auroc': 0.5}
  assert saved['provenance'] == {'seed': 0}
  assert any('good_only' in w and 'image_auroc' in w and 'pixel_auroc' in w for w in warnings), warnings
  assert any('weave' in w and 'aupro' in w for w in warnings), warnings
  table = (tmp_path / 'results.md').read_text()
  assert '| good_only | n/a | n/a | n/a | n/a | 50.0 | n/a |' in table
  assert sweep.finished({'workdir': str(tmp_path)})
  assert _leftovers(tmp_path) == []


def _script(tmp_path, name: str, body: str) -> str:
  path = tmp_path / name
  path.write_text(textwrap.dedent(body))
  return str(path)


def _fake_run(tmp_path, script: str) -> dict:
  return {'workdir': str(tmp_path / 'run'), 'args': [script, str(tmp_path / 'run')]}


# Exits preempted the first `fails` times it runs (counted in <workdir>/attempts), then finishes.
_FLAKY = """
import json, os, sys
workdir, fails = sys.argv[1], int(os.environ.get('FAILS', '0'))
path = os.path.join(workdir, 'attempts')
attempts = int(open(path).read()) + 1 if os.path.exists(path) else 1
open(path, 'w').write(str(attempts))
print('attempt', attempts, flush=True)
if attempts <= fails:
  sys.exit(int(os.environ.get('CODE', '75')))
json.dump({'mean': {'image_auroc': 1.0}}, open(os.path.join(workdir, 'metrics.json'), 'w'))
"""


def test_local_executor_reruns_a_preempted_run(tmp_path, monkeypatch):
  monkeypatch.setenv('FAILS', '2')
  run = _fake_run(tmp_path, _script(tmp_path, 'flaky.py', _FLAKY))
  assert sweep.LocalExecutor(max_resumes=3)(run) == 0
  assert (tmp_path / 'run' / 'attempts').read_text() == '3'
  log = (tmp_path / 'run' / 'output.log').read_text()
  assert 'attempt 3' in log and 'resuming (2 of 3)' in log
  assert sweep.finished(run)


def test_local_executor_reports_a_run_still_preempted_after_max_resumes(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('FAILS', '10')
  run = _fake_run(tmp_path, _script(tmp_path, 'flaky.py', _FLAKY))
  with pytest.raises(SystemExit) as exit_info:
    sweep.run_local([run], parallel=1, max_resumes=2)
  assert exit_info.value.code == jaxad.PREEMPTED_EXIT_CODE
  assert (tmp_path / 'run' / 'attempts').read_text() == '3'
  err = capsys.readouterr().err
  assert run['workdir'] in err and 'still preempted after 2 resumes' in err


def test_local_executor_does_not_rerun_a_failed_run(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('FAILS', '1')
  monkeypatch.setenv('CODE', '3')
  run = _fake_run(tmp_path, _script(tmp_path, 'flaky.py', _FLAKY))
  with pytest.raises(SystemExit) as exit_info:
    sweep.run_local([run], parallel=1, max_resumes=3)
  assert exit_info.value.code == 1
  assert (tmp_path / 'run' / 'attempts').read_text() == '1'
  assert f'{run["workdir"]}: exit 3' in capsys.readouterr().err


def test_local_executor_passes_a_stop_on_and_starts_nothing_more(tmp_path):
  waiter = _script(
    tmp_path,
    'waiter.py',
    """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
    open(os.path.join(sys.argv[1], 'started'), 'a').write('x')
    time.sleep(60)
    """,
  )
  run = _fake_run(tmp_path, waiter)
  executor = sweep.LocalExecutor(max_resumes=3)
  codes = []
  thread = threading.Thread(target=lambda: codes.append(executor(run)))
  thread.start()
  deadline = time.time() + 30
  while not (tmp_path / 'run' / 'started').exists() and time.time() < deadline:
    time.sleep(0.05)
  executor.stop(signal.SIGTERM)
  thread.join(30)
  assert codes == [jaxad.PREEMPTED_EXIT_CODE]
  assert (tmp_path / 'run' / 'started').read_text() == 'x'  # Not rerun after the stop.
  assert executor(_fake_run(tmp_path / 'run', waiter)) is None


def _fake_bin(tmp_path, **programs) -> dict:
  """Environment whose PATH starts with shell scripts `name` -> body."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  for name, body in programs.items():
    (bin_dir / name).write_text('#!/bin/sh\n' + body)
    (bin_dir / name).chmod(0o755)
  return {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}'}


_SCONTROL = 'if [ "$1" = show ]; then printf "gpu07\\n"; else echo "$@" >> "$CALLS"; fi\n'


@pytest.mark.parametrize('code', [0, 3, jaxad.PREEMPTED_EXIT_CODE])
def test_sweep_slurm_array_requeues_a_preempted_task(tmp_path, code):
  script = tmp_path / 'sweep.sbatch'
  script.write_text(
    sweep.slurm_script([{'args': ['-m', 'jaxad.main', '--workdir', 'a b']}], str(tmp_path), [])
  )
  calls = tmp_path / 'calls'
  env = _fake_bin(tmp_path, python=f'exit {code}\n', scontrol=_SCONTROL)
  env.update(CALLS=str(calls), SLURM_ARRAY_TASK_ID='0', SLURM_ARRAY_JOB_ID='42')
  out = subprocess.run(['bash', str(script)], env=env, capture_output=True, text=True, timeout=30)
  if code == jaxad.PREEMPTED_EXIT_CODE:
    assert out.returncode == 0 and calls.read_text() == 'requeue 42_0\n', out.stderr
  else:
    assert out.returncode == code and not calls.exists(), out.stderr


@pytest.mark.parametrize('code', [0, 1, jaxad.PREEMPTED_EXIT_CODE])
def test_slurm_sbatch_requeues_a_preempted_job(tmp_path, code):
  calls = tmp_path / 'calls'
  env = _fake_bin(tmp_path, srun=f'echo "$@" >> "$CALLS"; exit {code}\n', scontrol=_SCONTROL)
  env.update(CALLS=str(calls), SLURM_JOB_NODELIST='gpu07', SLURM_JOB_ID='7')
  out = subprocess.run(
    ['bash', str(REPO / 'launch' / 'slurm.sbatch'), '--config', 'c.py', '--workdir', 'w'],
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  srun, *requeue = calls.read_text().splitlines()
  assert srun.startswith('--kill-on-bad-exit=1 bash -c python -m jaxad.main --coordinator_address=gpu07:')
  if code == jaxad.PREEMPTED_EXIT_CODE:
    assert out.returncode == 0 and requeue == ['requeue 7'], out.stderr
  else:
    assert out.returncode == code and requeue == [], out.stderr


@pytest.mark.parametrize('code', [0, 1, jaxad.PREEMPTED_EXIT_CODE])
def test_tpu_vm_run_reports_a_preempted_run(tmp_path, code):
  env = _fake_bin(tmp_path, gcloud=f'exit {code}\n')
  out = subprocess.run(
    ['bash', str(REPO / 'launch' / 'tpu_vm.sh'), 'run', '--name', 'p', '--zone', 'z', '--', '--workdir', 'w'],
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert out.returncode == code
  assert ('preempted: rerun to resume' in out.stderr) == (code == jaxad.PREEMPTED_EXIT_CODE)
