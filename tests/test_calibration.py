"""Calibration: thresholds and normalisation made at the end of training, kept, restored and used."""

import json
import subprocess
import sys

import numpy as np
import pytest
import sklearn.metrics
from conftest import REPO, override, tiny_folder_config

import jaxad
from jaxad import calibration, evaluate, metrics, parallel, train
from jaxad.data import folder


def _mean_image(root, **overrides):
  from configs import mean_image

  c = tiny_folder_config(mean_image.get_config(), root)
  c.num_heatmaps = 0
  return override(c, **overrides)


def test_f1_max_threshold_is_the_best_f1_cut():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  scores = rng.normal(size=200) + labels
  t = metrics.f1_max_threshold(scores, labels)
  best = max(sklearn.metrics.f1_score(labels, scores >= c) for c in np.unique(scores))
  assert sklearn.metrics.f1_score(labels, scores >= t) == pytest.approx(best)
  assert sklearn.metrics.f1_score(labels, scores >= t) == pytest.approx(metrics.f1_max(scores, labels))


def test_holdout_is_seeded_disjoint_and_not_trained_on():
  samples = list(range(20))
  train_a, held_a = calibration.holdout_split(samples, 0.25, seed=3)
  assert calibration.holdout_split(samples, 0.25, seed=3) == (train_a, held_a)
  assert len(held_a) == 5 and sorted(train_a + held_a) == samples
  assert calibration.holdout_split(samples, 0.25, seed=4)[1] != held_a
  assert calibration.holdout_split(samples, 0.0, seed=3) == (samples, [])


def test_normal_quantile_flags_about_the_target_share_of_held_out_normals(embedded_dataset, tmp_path):
  """Calibrated on 30 held-out normal images only (no defect seen), at a 20 % false-positive target."""
  config = _mean_image(
    embedded_dataset,
    image_score='max_zscore',
    **{
      'dataset.categories': 'weave',
      'calibration.holdout': 0.5,
      'calibration.false_positive_rate': 0.2,
    },
  )
  train.train_and_evaluate(config, str(tmp_path))
  calib = calibration.load(str(tmp_path / 'weave'), 'weave')
  assert calib.source == 'holdout' and calib.num_images == 30
  record = json.loads((tmp_path / 'config.json').read_text())
  assert record['data']['train_images'] == 60  # The whole train/good folder is recorded ...
  detector = jaxad.load(str(tmp_path))
  train_split, held = calibration.holdout_split(
    folder.scan_split(embedded_dataset, 'weave', 'train'), 0.5, config.seed
  )
  flagged_held = detector.predict([s.image_path for s in held], category='weave').verdicts.mean()
  assert flagged_held <= 0.2  # By the quantile's definition, on the calibration images themselves.
  good = [s.image_path for s in folder.scan_split(embedded_dataset, 'weave', 'test') if s.label == 0]
  flagged_good = detector.predict(good, category='weave').verdicts.mean()
  assert flagged_good < 0.6  # Unseen normal images: about the target, not all of them.
  assert len(train_split) == 30  # ... but only the other half is trained on: 3 batches of 8.
  assert int(detector._runs['weave'].state['count']) == 24


def test_thresholds_survive_a_restore_in_a_fresh_process_and_match_evaluation(tiny_dataset, tmp_path):
  config = _mean_image(tiny_dataset, image_score='max_zscore')
  train.train_and_evaluate(config, str(tmp_path))
  category = folder.list_categories(tiny_dataset)[0]
  detector = jaxad.load(str(tmp_path))
  tests = folder.scan_split(tiny_dataset, category, 'test')
  paths = [s.image_path for s in tests]
  pred = detector.predict(paths, category=category)
  # The same numbers as evaluation (the model's maps, the stored z-score statistics).
  run = detector._runs[category]
  scored = evaluate.score_samples(config, run.model, run.state, run.frozen, tests, parallel.make_mesh())
  np.testing.assert_allclose(pred.maps, scored['maps'], rtol=1e-6, atol=1e-7)
  calib = detector.calibrations[category]
  np.testing.assert_allclose(pred.scores, calib.image_scores(scored['maps'], scored['scores']), rtol=1e-5)
  script = (
    'import json, sys, jaxad\n'
    'd = jaxad.load(sys.argv[1]); c = d.calibrations[sys.argv[2]]\n'
    'p = d.predict(sys.argv[3:], category=sys.argv[2])\n'
    'print(json.dumps([c.image_threshold, c.pixel_threshold, p.scores.tolist(), p.verdicts.tolist()]))\n'
  )
  done = subprocess.run(
    [sys.executable, '-c', script, str(tmp_path), category, *paths],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  threshold, pixel_threshold, scores, verdicts = json.loads(done.stdout.strip().splitlines()[-1])
  assert (threshold, pixel_threshold) == (calib.image_threshold, calib.pixel_threshold)
  np.testing.assert_allclose(scores, pred.scores, rtol=1e-6)
  assert verdicts == pred.verdicts.tolist()


def test_a_manual_threshold_changes_the_verdicts(tiny_dataset, tmp_path):
  category = folder.list_categories(tiny_dataset)[0]
  paths = [s.image_path for s in folder.scan_split(tiny_dataset, category, 'test')]
  verdicts = {}
  for threshold in (-1e9, 1e9):
    over = {'calibration.rule': 'manual', 'calibration.manual_threshold': threshold}
    train.train_and_evaluate(_mean_image(tiny_dataset, **over), str(tmp_path))  # Rescoring only.
    verdicts[threshold] = jaxad.load(str(tmp_path)).predict(paths, category=category).verdicts
  assert verdicts[-1e9].all() and not verdicts[1e9].any()


def test_evaluate_cli_scores_another_test_set_without_touching_the_run(tiny_dataset, tmp_path):
  run = tmp_path / 'run'
  train.train_and_evaluate(_mean_image(tiny_dataset), str(run))
  before = (run / 'metrics.json').read_bytes()
  out = tmp_path / 'other'
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'jaxad.evaluate',
      f'--workdir={run}',
      f'--output={out}',
      f'--config.dataset.root={tiny_dataset}',
      '--config.num_heatmaps=1',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert (run / 'metrics.json').read_bytes() == before
  written = json.loads((out / 'metrics.json').read_text())
  trained = json.loads(before)
  for category, values in trained['categories'].items():
    assert written['categories'][category]['pixel_auroc'] == pytest.approx(values['pixel_auroc'], abs=1e-6)
    assert 0.0 <= written['categories'][category]['accuracy_at_threshold'] <= 1.0
  assert list((out / 'heatmaps').iterdir())


def test_evaluate_cli_refuses_an_override_it_would_ignore(tiny_dataset, tmp_path):
  run = tmp_path / 'run'
  train.train_and_evaluate(_mean_image(tiny_dataset), str(run))
  done = subprocess.run(
    [sys.executable, '-m', 'jaxad.evaluate', f'--workdir={run}', '--config.anomaly_map=deviation'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode != 0
  assert "anomaly_map: 'model' -> 'deviation'" in done.stderr
  assert not (run / 'evaluations').exists()
