"""Nothing lost, nothing silently wrong: run records, refused reruns, locks, signals, damaged checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, override, tiny_folder_config, tiny_sivt_config

import jaxad
from jaxad import parallel, provenance, train
from jaxad.data import folder, pipeline


def _mean_image_config(root: str, **overrides):
  from configs import mean_image

  c = tiny_folder_config(mean_image.get_config(), root)
  c.num_heatmaps = 0
  return override(c, **overrides)


def _samples(config):
  root = config.dataset.root
  return [s for c in folder.resolve_categories(root, 'all') for s in pipeline.scan(config, root, c, 'train')]


def test_rerun_with_other_training_settings_is_refused_and_names_them(tiny_dataset, tmp_path):
  config = _mean_image_config(tiny_dataset)
  first = train.train_and_evaluate(config, str(tmp_path))
  record = json.loads((tmp_path / 'config.json').read_text())
  assert record['config']['seed'] == 0 and record['data']['train_images'] == 24
  assert record['environment']['jaxad_version'] == jaxad.__version__
  assert (
    json.loads((tmp_path / 'metrics.json').read_text())['provenance']['device_count'] == jax.device_count()
  )
  for field, value in (('seed', 1), ('dataset.image_size', 32), ('optimizer.learning_rate', 0.5)):
    with pytest.raises(provenance.ConfigMismatch, match=field.replace('.', r'\.')):
      train.train_and_evaluate(_mean_image_config(tiny_dataset, **{field: value}), str(tmp_path))
  with pytest.raises(provenance.ConfigMismatch, match=r'model\.name'):
    train.train_and_evaluate(tiny_sivt_config(tiny_dataset, num_heatmaps=0), str(tmp_path))
  # Scoring and logging settings may change: the finished run is only evaluated again.
  rescored = train.train_and_evaluate(
    _mean_image_config(tiny_dataset, image_score='max_zscore', **{'mean_image.smoothing_sigma': 1.0}),
    str(tmp_path),
  )
  assert rescored.keys() == first.keys()
  assert json.loads((tmp_path / 'config.json').read_text()) == record  # The training record stays.
  # The explicit switch continues with the new settings and records them.
  train.train_and_evaluate(_mean_image_config(tiny_dataset, seed=1, allow_config_change=True), str(tmp_path))
  assert json.loads((tmp_path / 'config.json').read_text())['config']['seed'] == 1


def test_changed_training_data_is_refused(tiny_dataset, tmp_path):
  root = tmp_path / 'data'
  shutil.copytree(tiny_dataset, root)
  config = _mean_image_config(str(root))
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  victim = sorted((root / folder.list_categories(str(root))[0] / 'train' / 'good').iterdir())[0]
  victim.unlink()
  with pytest.raises(provenance.ConfigMismatch, match='training data'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_a_second_job_on_a_locked_workdir_refuses_at_once(tiny_dataset, tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time; from jaxad import train\n'
      'with train.workdir_lock(sys.argv[1]):\n  print("LOCKED", flush=True); time.sleep(60)',
      str(tmp_path),
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'LOCKED'
    with pytest.raises(train.WorkdirLocked, match=f'pid {holder.pid} on '):
      train.train_and_evaluate(_mean_image_config(tiny_dataset), str(tmp_path))
    assert not (tmp_path / 'checkpoints').exists()
  finally:
    holder.kill()
    holder.wait()
  train.train_and_evaluate(_mean_image_config(tiny_dataset), str(tmp_path))  # Released with its holder.


def test_sigterm_during_the_final_save_keeps_the_checkpoint(tiny_dataset, tmp_path, monkeypatch):
  """SIGTERM while the last (asynchronous) checkpoint is being written: it completes, then the run stops."""
  config = _mean_image_config(tiny_dataset, num_epochs=2)  # 24 images / 8: 6 steps.
  make_manager, loop = train.checkpoint_manager, train.loop
  loop_done = []

  def loop_then_mark(*args, **kwargs):
    loop(*args, **kwargs)
    loop_done.append(True)

  def manager_signalled_in_final_wait(workdir, config):
    mngr = make_manager(workdir, config)
    wait = mngr.wait_until_finished

    def signal_then_wait():
      if loop_done and len(loop_done) == 1:  # The wait for the final save, once.
        loop_done.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
      wait()

    mngr.wait_until_finished = signal_then_wait
    return mngr

  outside = []  # Stands in for the default SIGTERM action, which would kill the test process.
  previous = signal.signal(signal.SIGTERM, lambda *a: outside.append(a[0]))
  monkeypatch.setattr(train, 'checkpoint_manager', manager_signalled_in_final_wait)
  monkeypatch.setattr(train, 'loop', loop_then_mark)
  try:
    with pytest.raises(train.Preempted):
      train.train(config, str(tmp_path), _samples(config), parallel.make_mesh())
  finally:
    signal.signal(signal.SIGTERM, previous)
  monkeypatch.undo()
  assert not outside  # The harness's handler, still installed, took the signal.
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 6
  assert not [p for p in (tmp_path / 'checkpoints').iterdir() if 'tmp' in p.name]
  _, state, _ = train.train(config, str(tmp_path), _samples(config), parallel.make_mesh())
  assert int(state['count']) == 48  # Restored at the end: nothing retrained.


def test_a_preempted_run_exits_with_the_requeue_code(tmp_path):
  """`python -m jaxad.main` exits 75 when training stops on a signal (a stub stands in for training)."""
  script = (
    'import sys\n'
    'from absl import app\n'
    'from jaxad import main, train\n'
    'def preempted(config, workdir):\n'
    '  raise train.Preempted("SIGTERM at step 3")\n'
    'train.train_and_evaluate = preempted\n'
    'sys.argv = ["jaxad.main", "--config=configs/mean_image.py", "--workdir=" + sys.argv[1]]\n'
    'app.run(main.main)\n'
  )
  done = subprocess.run(
    [sys.executable, '-c', script, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == jaxad.PREEMPTED_EXIT_CODE == 75, done.stderr[-2000:]
  assert 'Stopped cleanly: SIGTERM at step 3' in done.stderr


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_dataset, tmp_path):
  config = _mean_image_config(tiny_dataset, num_epochs=2, checkpoint_every=2, keep_checkpoints=3)  # 6 steps.
  _, full, _ = train.train(config, str(tmp_path / 'full'), _samples(config), parallel.make_mesh())
  work = tmp_path / 'run'
  train.train(config, str(work), _samples(config), parallel.make_mesh(), stop_after=4)  # Saves 2 and 4.
  for path in (work / 'checkpoints' / '4').rglob('*'):
    if path.is_file():
      path.write_bytes(b'\0garbage')
  _, resumed, _ = train.train(config, str(work), _samples(config), parallel.make_mesh())
  for k in full:
    np.testing.assert_array_equal(np.asarray(resumed[k]), np.asarray(full[k]))
  assert (work / 'checkpoints_damaged' / '4').is_dir()  # Set aside, not deleted.
  for path in (work / 'checkpoints').iterdir():
    if path.name.isdigit():
      shutil.rmtree(path)
      path.mkdir()  # Every step now empty: one clear error.
  with pytest.raises(train.CheckpointError, match='No checkpoint in .* can be restored'):
    train.train(config, str(work), _samples(config), parallel.make_mesh())


def test_log_has_no_repeated_steps_after_a_resume(tiny_dataset, tmp_path):
  config = _mean_image_config(tiny_dataset, num_epochs=2, log_every=1, checkpoint_every=100)
  train.train(config, str(tmp_path), _samples(config), parallel.make_mesh(), stop_after=3)
  with open(tmp_path / 'log.jsonl', 'a') as f:  # What a run killed after step 5 would have left.
    f.write(json.dumps({'step': 4, 'train/loss': 1.0}) + '\n' + json.dumps({'step': 5, 'train/loss': 1.0}))
    f.write('\n{"step": 6, "train/lo')
  train.train(config, str(tmp_path), _samples(config), parallel.make_mesh())
  steps = [json.loads(line)['step'] for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_an_unreadable_test_image_stops_the_run_before_training(tiny_dataset, tmp_path):
  root = tmp_path / 'data'
  shutil.copytree(tiny_dataset, root)
  category = folder.list_categories(str(root))[0]
  broken = sorted((root / category / 'test' / 'good').iterdir())[0]
  broken.write_bytes(b'not an image')
  with pytest.raises(folder.DatasetError, match=broken.name):
    train.train_and_evaluate(_mean_image_config(str(root)), str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
