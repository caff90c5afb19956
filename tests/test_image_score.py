"""The harness's image-level scores: the model's own, or the maximum of per-pixel z-scores."""

import json

import numpy as np
import pytest
from conftest import override, tiny_folder_config, tiny_sivt_config
from sklearn.metrics import roc_auc_score

import jaxad
from configs import mean_image
from jaxad import calibration, evaluate, parallel, train
from jaxad.data import folder, pipeline


def _maps_with_a_hard_corner(rng, n, defect: bool):
  """[n, 32, 32] maps: low noise, a corner that is always large and noisy, and (if `defect`) a bump
  elsewhere that is smaller than the corner's typical maximum."""
  maps = rng.normal(0.1, 0.01, (n, 32, 32))
  maps[:, :8, :8] += rng.normal(1.0, 0.2, (n, 8, 8))
  if defect:
    for m in maps:
      y, x = rng.integers(12, 28, 2)
      m[y : y + 3, x : x + 3] += 0.3
  return maps


def test_max_zscore_lets_a_small_defect_beat_an_always_hard_region():
  rng = np.random.default_rng(0)
  normal_train = _maps_with_a_hard_corner(rng, 60, defect=False)
  test = np.concatenate([_maps_with_a_hard_corner(rng, 40, False), _maps_with_a_hard_corner(rng, 40, True)])
  labels = np.repeat([0, 1], 40)
  raw = roc_auc_score(labels, test.reshape(80, -1).max(1))
  standardised = roc_auc_score(labels, evaluate.max_zscore(test, normal_train))
  assert raw < 0.7  # The hard corner decides the map's maximum.
  assert standardised > 0.95


def test_max_zscore_floors_the_std_of_pixels_that_never_vary():
  normal = np.ones((5, 4, 4))
  normal[:, 0, 0] = [0.0, 1.0, 2.0, 3.0, 4.0]  # One varying pixel; the other 15 are constant.
  test = np.ones((1, 4, 4))
  test[0, 3, 3] = 1.0 + 1e-3  # A tiny change where training never varied.
  std_mean = np.sqrt(2.0) / 16
  expected = 1e-3 / (0.1 * std_mean)  # Divided by the floor, not by zero.
  np.testing.assert_allclose(evaluate.max_zscore(test, normal), [expected], rtol=1e-6)


def _mean_image_config(root, **overrides):
  config = tiny_folder_config(mean_image.get_config(), root)
  config.num_heatmaps = 0
  return override(config, **overrides)


@pytest.mark.parametrize('unified', [False, True])
def test_harness_standardises_against_the_same_categorys_training_maps(tiny_dataset, tmp_path, unified):
  """Per category (one mean image each) and unified (one tiny SIVT for both categories)."""
  if unified:
    config = tiny_sivt_config(tiny_dataset, image_score='max_zscore', num_heatmaps=0)
  else:
    config = _mean_image_config(tiny_dataset, image_score='max_zscore')
  results = train.train_and_evaluate(config, str(tmp_path))
  mesh = parallel.make_mesh()
  categories = folder.list_categories(tiny_dataset)
  train_by_cat = {c: pipeline.scan(config, tiny_dataset, c, 'train') for c in categories}
  runs = (
    {tmp_path: sum(train_by_cat.values(), [])}
    if unified
    else {tmp_path / c: train_by_cat[c] for c in categories}
  )
  restored = {d: train.train(config, str(d), s, mesh) for d, s in runs.items()}  # Restores; no steps.
  for category in categories:
    model, state, frozen = restored[tmp_path if unified else tmp_path / category]
    normal = evaluate.score_samples(config, model, state, frozen, train_by_cat[category], mesh)
    test = evaluate.score_samples(
      config, model, state, frozen, pipeline.scan(config, tiny_dataset, category, 'test'), mesh
    )
    expected = roc_auc_score(test['labels'], evaluate.max_zscore(test['maps'], normal['maps']))
    assert results[category]['image_auroc'] == pytest.approx(expected, abs=1e-9)
    pixel = roc_auc_score(test['masks'].ravel() > 0, test['maps'].ravel())
    assert results[category]['pixel_auroc'] == pytest.approx(pixel, abs=1e-6)  # Maps unchanged.
  assert json.loads((tmp_path / 'metrics.json').read_text())['categories'] == results


def test_unknown_image_score_fails_before_training(tiny_dataset, tmp_path):
  config = _mean_image_config(tiny_dataset, image_score='maximum')
  with pytest.raises(ValueError, match="Unknown image_score 'maximum'"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not any(tmp_path.iterdir())


def _texture_error_maps(rng, n, smooth: bool):
  """[n, 32, 32] reconstruction-error maps of a stochastic texture: high everywhere the texture is,
  and (if `smooth`) low inside a 10x10 region where a defect removed the texture."""
  maps = rng.gamma(4.0, 0.05, (n, 32, 32))
  masks = np.zeros((n, 32, 32), bool)
  if smooth:
    for m, k in zip(maps, masks):
      y, x = rng.integers(2, 20, 2)
      m[y : y + 10, x : x + 10] = rng.gamma(4.0, 0.005, (10, 10))
      k[y : y + 10, x : x + 10] = True
  return maps, masks


def test_deviation_map_flags_defects_whose_error_is_abnormally_low():
  rng = np.random.default_rng(0)
  normal_train, _ = _texture_error_maps(rng, 60, smooth=False)
  good, good_masks = _texture_error_maps(rng, 10, smooth=False)
  smooth, smooth_masks = _texture_error_maps(rng, 10, smooth=True)
  maps, masks = np.concatenate([good, smooth]), np.concatenate([good_masks, smooth_masks])
  mean, std = calibration.zscore_stats(normal_train)
  deviation = calibration.pixel_maps(maps, 'deviation', mean, std)
  np.testing.assert_allclose(deviation, np.abs(maps - normal_train.mean(0)) / std, rtol=1e-12)
  assert roc_auc_score(masks.ravel(), maps.ravel()) < 0.1  # The model's map: lowest inside defects.
  assert roc_auc_score(masks.ravel(), deviation.ravel()) > 0.9
  np.testing.assert_array_equal(calibration.pixel_maps(maps, 'model'), maps)
  with pytest.raises(ValueError, match="Unknown anomaly_map 'signed'"):
    calibration.pixel_maps(maps, 'signed', mean, std)


def test_harness_deviation_maps_are_evaluated_calibrated_and_predicted_alike(tiny_dataset, tmp_path):
  config = _mean_image_config(tiny_dataset, anomaly_map='deviation')
  results = train.train_and_evaluate(config, str(tmp_path))
  mesh = parallel.make_mesh()
  for category in folder.list_categories(tiny_dataset):
    model, state, frozen = train.train(
      config, str(tmp_path / category), pipeline.scan(config, tiny_dataset, category, 'train'), mesh
    )
    normal = evaluate.score_samples(
      config, model, state, frozen, pipeline.scan(config, tiny_dataset, category, 'train'), mesh
    )
    tests = pipeline.scan(config, tiny_dataset, category, 'test')
    test = evaluate.score_samples(config, model, state, frozen, tests, mesh)
    mean, std = normal['maps'].mean(0), normal['maps'].std(0)
    std = np.maximum(std, 0.1 * std.mean())
    expected = np.abs(test['maps'] - mean) / std
    pixel = roc_auc_score(test['masks'].ravel() > 0, expected.ravel())
    assert results[category]['pixel_auroc'] == pytest.approx(pixel, abs=1e-6)
    image = roc_auc_score(test['labels'], test['scores'])  # The image score stays the model's own.
    assert results[category]['image_auroc'] == pytest.approx(image, abs=1e-9)
    detector = jaxad.load(str(tmp_path))
    pred = detector.predict([s.image_path for s in tests], category=category)
    np.testing.assert_allclose(pred.maps, expected, rtol=1e-4, atol=1e-5)
    calib = detector.calibrations[category]
    assert calib.anomaly_map == 'deviation'
    normal_deviation = np.abs(normal['maps'] - mean) / std
    assert calib.pixel_threshold == pytest.approx(
      np.quantile(normal_deviation, 0.99, method='higher'), rel=1e-5
    )
    np.testing.assert_array_equal(pred.masks, pred.maps >= calib.pixel_threshold)
    # The image threshold is on the model's own scores, as the image scores are.
    assert calib.image_threshold == pytest.approx(np.quantile(normal['scores'], 0.95, method='higher'))
    np.testing.assert_allclose(pred.scores, test['scores'], rtol=1e-5)


def test_unknown_anomaly_map_fails_before_training(tiny_dataset, tmp_path):
  config = _mean_image_config(tiny_dataset, anomaly_map='signed')
  with pytest.raises(ValueError, match="Unknown anomaly_map 'signed'"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not any(tmp_path.iterdir())
