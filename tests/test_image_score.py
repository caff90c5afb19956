"""The harness's image-level scores: the model's own, or the maximum of per-pixel z-scores."""

import json

import numpy as np
import pytest
from conftest import override, tiny_folder_config, tiny_sivt_config
from sklearn.metrics import roc_auc_score

from configs import mean_image
from jaxad import evaluate, parallel, train
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
