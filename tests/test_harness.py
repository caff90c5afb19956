"""The shared harness: determinism, bitwise resume, sharding over 8 fake devices, outputs, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_sivt_config
from PIL import Image

import jaxad
from jaxad import parallel, train
from jaxad.data import folder, pipeline


def _train(config, workdir, stop_after=None):
  root = config.dataset.root
  samples = [
    s for c in folder.resolve_categories(root, 'all') for s in pipeline.scan(config, root, c, 'train')
  ]
  _, state, _ = train.train(config, str(workdir), samples, parallel.make_mesh(), stop_after=stop_after)
  return jax.device_get(state.params)


def _assert_bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_same_seed_is_bitwise_reproducible_and_seed_matters(tiny_dataset, tmp_path):
  config = tiny_sivt_config(tiny_dataset)
  a = _train(config, tmp_path / 'a')
  b = _train(config, tmp_path / 'b')
  _assert_bitwise_equal(a, b)
  c = _train(tiny_sivt_config(tiny_dataset, seed=1), tmp_path / 'c')
  assert not np.array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(c)[0])


def test_resume_after_sigterm_at_a_random_step_equals_uninterrupted_run(tiny_dataset, tmp_path, monkeypatch):
  """A real SIGTERM (to this process) at a random step, then a rerun: bitwise the uninterrupted run."""
  import os
  import re
  import signal

  from jaxad import writers

  config = tiny_sivt_config(tiny_dataset, num_epochs=3, log_every=1)  # 9 steps.
  full = _train(config, tmp_path / 'full')
  kill_at = int(np.random.default_rng().integers(1, 8))  # A different step each test run.
  write_scalars = writers.MetricWriter.write_scalars

  def write_and_maybe_kill(self, step, scalars):  # Runs inside the training loop only.
    write_scalars(self, step, scalars)
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(writers.MetricWriter, 'write_scalars', write_and_maybe_kill)
  with pytest.raises(train.Preempted) as stopped:
    _train(config, tmp_path / 'killed')
  monkeypatch.undo()
  step = int(re.search(r'SIGTERM at step (\d+):', str(stopped.value)).group(1))
  assert kill_at <= step < 9, (kill_at, step)
  resumed = _train(config, tmp_path / 'killed')
  _assert_bitwise_equal(full, resumed)
  losses = [
    [
      (r['step'], r['train/loss'])
      for r in map(json.loads, (tmp_path / d / 'log.jsonl').open())
      if 'train/loss' in r
    ]
    for d in ('full', 'killed')
  ]
  assert losses[0] == losses[1] and len(losses[0]) == 9, kill_at


def test_grain_batches_do_not_depend_on_worker_count(tiny_dataset):
  from absl import flags

  flags.FLAGS.mark_as_parsed()
  batches = []
  for workers in (0, 2):
    config = tiny_sivt_config(tiny_dataset, **{'dataset.num_workers': workers})
    samples = pipeline.scan(config, tiny_dataset, folder.list_categories(tiny_dataset)[0], 'train')
    source = pipeline.ImageSource(samples, 64, 3)
    it = pipeline.train_iterator(source, config, process_index=0, process_count=1)
    batches.append([next(it)['image'] for _ in range(3)])
  for x, y in zip(*batches):
    np.testing.assert_array_equal(x, y)


_EIGHT_DEVICES = textwrap.dedent("""
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    sys.path[:0] = [{tests!r}, {repo!r}]
    import jax, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    import test_harness as th
    from conftest import tiny_sivt_config
    config = tiny_sivt_config({root!r}, num_epochs=3)
    full = th._train(config, {work!r} + '/full')
    th._train(config, {work!r} + '/resumed', stop_after=2)
    th._assert_bitwise_equal(full, th._train(config, {work!r} + '/resumed'))
    th._assert_bitwise_equal(full, th._train(config, {work!r} + '/again'))
    print('EIGHT_DEVICES_OK')
""")


def test_eight_devices_resume_and_repeat_bitwise(tiny_dataset, tmp_path):
  script = _EIGHT_DEVICES.format(
    tests=str(REPO / 'tests'), repo=str(REPO), root=tiny_dataset, work=str(tmp_path)
  )
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=900)
  assert 'EIGHT_DEVICES_OK' in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def _tiny_main_command(workdir, root, *overrides) -> list[str]:
  """`python -m jaxad.main` with configs/sivt.py shrunk to seconds (as tiny_sivt_config)."""
  return [
    sys.executable,
    '-m',
    'jaxad.main',
    '--config',
    str(REPO / 'configs' / 'sivt.py'),
    '--workdir',
    str(workdir),
    '--config.dataset.name=folder',
    f'--config.dataset.root={root}',
    '--config.dataset.image_size=64',
    '--config.batch_size=8',
    '--config.eval_batch_size=8',
    '--config.sivt.feature_size=8',
    '--config.sivt.width=32',
    '--config.sivt.encoder_depth=1',
    '--config.sivt.decoder_depth=1',
    *overrides,
  ]


def test_main_writes_outputs_and_rerun_resumes(tiny_dataset, tmp_path):
  workdir = tmp_path / 'run'
  cmd = _tiny_main_command(workdir, tiny_dataset, '--config.num_epochs=1', '--config.num_heatmaps=2')
  first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  result = json.loads((workdir / 'metrics.json').read_text())
  categories = folder.list_categories(tiny_dataset)
  assert sorted(result['categories']) == categories
  for name in ('image_auroc', 'image_ap', 'pixel_auroc', 'pixel_ap', 'aupro', 'f1_max'):
    assert 0.0 <= result['mean'][name] <= 1.0
  assert '| **mean** |' in (workdir / 'results.md').read_text()
  for c in categories:
    pngs = list((workdir / 'heatmaps' / c).glob('*.png'))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size == (3 * 64, 64)
  logged = [json.loads(line) for line in (workdir / 'log.jsonl').read_text().splitlines()]
  assert logged and all(np.isfinite(r['train/loss']) for r in logged if 'train/loss' in r)
  assert list((workdir / 'tb').iterdir())
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f'Resumed from step {steps[-1]}' in second.stderr


@pytest.mark.slow
def test_compilation_cache_is_reused_and_changes_no_result(tiny_dataset, tmp_path):
  cache = tmp_path / 'xla'
  env = {**os.environ, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}  # Cache every program.
  results, entries = [], []
  # Three fresh runs: b (the same seed) and c (another seed, a step argument) train and score with
  # a's compiled programs.
  for run, seed in (('a', 0), ('b', 0), ('c', 1)):
    cmd = _tiny_main_command(
      tmp_path / run,
      tiny_dataset,
      '--config.num_epochs=1',
      '--config.num_heatmaps=0',
      f'--compilation_cache_dir={cache}',
      f'--config.seed={seed}',
    )
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results.append(json.loads((tmp_path / run / 'metrics.json').read_text()))
    entries.append(sorted(p.name for p in cache.iterdir()))
  assert any(name.startswith('jit_step') for name in entries[0])
  assert entries[0] == entries[1] == entries[2]  # Runs b and c compiled nothing new.
  assert results[0] == results[1]


def test_per_category_mode_with_periodic_evaluation(tiny_dataset, tmp_path):
  config = tiny_sivt_config(tiny_dataset, num_epochs=2, eval_every_epochs=1, **{'dataset.unified': False})
  results = train.train_and_evaluate(config, str(tmp_path))
  categories = folder.list_categories(tiny_dataset)
  assert sorted(results) == categories
  for c in categories:
    assert (tmp_path / c / 'checkpoints').exists()
    logged = [json.loads(line) for line in (tmp_path / c / 'log.jsonl').read_text().splitlines()]
    assert any('eval/image_auroc' in r for r in logged)  # Evaluated after epoch 1 of 2.
    assert (tmp_path / c / 'eval_step2' / 'heatmaps' / c).is_dir()
  summary = json.loads((tmp_path / 'metrics.json').read_text())
  assert sorted(summary['categories']) == categories


def test_corrupt_training_image_stops_with_its_name(tiny_dataset, tmp_path):
  import shutil

  root = tmp_path / 'data'
  shutil.copytree(tiny_dataset, root)
  category = folder.list_categories(str(root))[0]
  victim = sorted((root / category / 'train' / 'good').iterdir())[3]
  victim.write_bytes(victim.read_bytes()[:60])
  with pytest.raises(folder.DatasetError, match=victim.name):
    train.train_and_evaluate(tiny_sivt_config(str(root)), str(tmp_path / 'run'))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path):
  config = tiny_sivt_config(tiny_dataset, num_epochs=3, checkpoint_every=1)
  _train(config, tmp_path, stop_after=2)
  config.optimizer.learning_rate = 1e30  # The resumed run's first update overflows.
  config.optimizer.warmup_steps = 0
  with pytest.raises(train.TrainingDiverged, match='Last good checkpoint: step 2'):
    _train(config, tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 2


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tiny_dataset, tmp_path):
  import signal
  import time

  workdir = tmp_path / 'run'
  cmd = _tiny_main_command(
    workdir, tiny_dataset, '--config.num_epochs=400', '--config.log_every=1', '--config.num_heatmaps=0'
  )
  err = tmp_path / 'stderr.txt'
  with open(err, 'w') as f:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=f, text=True)
    log, deadline = workdir / 'log.jsonl', time.time() + 300
    while not (log.exists() and log.read_text().count('\n') >= 2) and time.time() < deadline:
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == jaxad.PREEMPTED_EXIT_CODE, err.read_text()[-3000:]
  assert 'Stopped cleanly: SIGTERM at step' in err.read_text()
  steps = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert steps and max(steps) < 600  # 400 epochs of 24 images at batch 8 = 1200 steps.
  assert not (workdir / 'metrics.json').exists()
  with open(err, 'w') as f:
    rerun = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=f, text=True)
    deadline = time.time() + 300
    while 'Resumed from step' not in err.read_text() and time.time() < deadline:
      time.sleep(0.5)
    rerun.send_signal(signal.SIGTERM)
    rerun.wait(timeout=300)
  assert f'Resumed from step {max(steps)}' in err.read_text()


def test_rot90_augmentation_turns_image_and_mask_together_without_interpolation():
  from configs import common

  config = common.get_config()
  config.augment.rot90 = True
  augment = pipeline.augmentation(config)
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(8, 8, 3)).astype(np.float32)
  mask = (rng.uniform(size=(8, 8, 1)) > 0.5).astype(np.float32)
  turns = set()
  for _ in range(40):
    out = augment({'image': image, 'mask': mask}, rng)
    k = next(k for k in range(4) if np.array_equal(out['image'], np.rot90(image, k)))
    np.testing.assert_array_equal(out['mask'], np.rot90(mask, k))
    turns.add(k)
  assert turns == {0, 1, 2, 3}


def test_cached_quarter_turns_pick_the_turn_augment_draws():
  """PickQuarterTurn on a cache of the four turns returns what Augment returns for the same draw."""
  from configs import common

  config = common.get_config()
  config.augment.rot90 = True
  augment = pipeline.augmentation(config)
  image = np.random.default_rng(0).uniform(size=(8, 8, 3)).astype(np.float32)
  cached = pipeline.ArraySource(
    {'image': np.stack([np.rot90(image, k) for k in range(4)])[None]}, 'turns', quarter_turns=True
  )
  assert pipeline.cacheable_turns(config) == 4 and pipeline.holds_quarter_turns(cached)
  picked = set()
  for seed in range(40):
    out = augment({'image': image, 'mask': image[..., :1]}, np.random.default_rng(seed))
    pick = pipeline.PickQuarterTurn()(cached[0], np.random.default_rng(seed))['image']
    np.testing.assert_array_equal(pick, out['image'])
    picked.add(next(k for k in range(4) if np.array_equal(pick, np.rot90(image, k))))
  assert picked == {0, 1, 2, 3}
  config.augment.hflip = True
  assert pipeline.cacheable_turns(config) is None  # Flips are not cached: the backbone runs every step.


def test_quarter_turn_feature_cache_trains_as_the_backbone_every_step(tiny_dataset, tmp_path):
  """SIVT with quarter turns: features cached once per turn train as the backbone run in every step
  (same turns, losses and parameters to float rounding)."""
  logs, params = [], []
  for cache in (True, False):
    config = tiny_sivt_config(
      tiny_dataset, log_every=1, **{'augment.rot90': True, 'backbone.cache_features': cache}
    )
    params.append(_train(config, tmp_path / str(cache)))
    with open(tmp_path / str(cache) / 'log.jsonl') as f:
      logs.append([r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r])
  assert len(logs[0]) == len(logs[1]) > 4
  np.testing.assert_allclose(logs[0], logs[1], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_quarter_turn_cache_resumes_bitwise(tiny_dataset, tmp_path):
  """A run on cached quarter turns stopped after 3 steps and resumed (grain restores the picks'
  iterator) equals the uninterrupted run bitwise."""
  config = tiny_sivt_config(tiny_dataset, num_epochs=3, checkpoint_every=3, **{'augment.rot90': True})
  full = _train(config, tmp_path / 'full')
  _train(config, tmp_path / 'resumed', stop_after=3)
  assert sorted(p.name for p in (tmp_path / 'resumed' / 'checkpoints').iterdir() if p.name.isdigit()) == ['3']
  _assert_bitwise_equal(full, _train(config, tmp_path / 'resumed'))
  with open(tmp_path / 'resumed' / 'log.jsonl') as f:
    assert max(r['step'] for r in map(json.loads, f)) > 3  # Steps after the resume ran.
