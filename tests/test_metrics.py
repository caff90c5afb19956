"""Tests for jaxad.metrics against scikit-learn and a slow reference AUPRO."""

from bisect import bisect_right

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from jaxad import metrics

TOL = 1e-9


# ----------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------


def sk_f1_max(scores, labels):
  p, r, _ = precision_recall_curve(labels, scores)
  with np.errstate(invalid='ignore', divide='ignore'):
    f1 = 2 * p * r / (p + r)
  return float(np.nanmax(np.where(np.isfinite(f1), f1, 0.0)))


def official_trapezoid(x, y, x_max):
  """Trapezoid with interpolation at x_max, as in MVTec AD's generic_util."""
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  correction = 0.0
  if x_max not in x:
    ins = bisect_right(list(x), x_max)
    assert 0 < ins < len(x)
    y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
    correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
  keep = x <= x_max
  x, y = x[keep], y[keep]
  return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def reference_pro_curve(maps, masks):
  """Slow, direct PRO curve: one point per distinct map value (descending)."""
  maps = np.asarray(maps, dtype=np.float64)
  masks = np.asarray(masks, dtype=bool)
  regions = []
  for i, m in enumerate(masks):
    lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
    regions += [(i, lab == k) for k in range(1, n + 1)]
  normal = ~masks
  fprs, pros = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    fprs.append(pred[normal].mean())
    pros.append(np.mean([pred[i][r].mean() for i, r in regions]))
  fprs.append(1.0)
  pros.append(1.0)
  return np.array(fprs), np.array(pros)


def reference_aupro(maps, masks, fpr_limit=0.3):
  fprs, pros = reference_pro_curve(maps, masks)
  return official_trapezoid(fprs, pros, fpr_limit) / fpr_limit


def random_masks(rng, n, h, w, blobs=(1, 4), p_anomalous=0.7):
  """Masks with several random rectangles/diagonal strokes per anomalous image."""
  masks = np.zeros((n, h, w), dtype=bool)
  for i in range(n):
    if rng.random() > p_anomalous:
      continue
    for _ in range(rng.integers(*blobs)):
      if rng.random() < 0.3:  # diagonal stroke: only 8-connected
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        for d in range(rng.integers(2, 5)):
          masks[i, y + d, x + d] = True
      else:
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        masks[i, y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
  if not masks.any():
    masks[0, 1:3, 1:3] = True
  return masks


def random_maps(rng, masks, decimals=None):
  maps = rng.standard_normal(masks.shape) + 1.2 * masks * rng.random(masks.shape)
  if decimals is not None:
    maps = np.round(maps, decimals)
  return maps


# ----------------------------------------------------------------------------
# Image / pixel metrics vs scikit-learn
# ----------------------------------------------------------------------------


def _binary_cases():
  rng = np.random.default_rng(0)
  cases = []
  for n in (2, 7, 50, 500):
    y = rng.random(n) < 0.4
    y[0], y[-1] = True, False
    s = rng.standard_normal(n) + y
    cases.append((f'random{n}', s, y))
    cases.append((f'ties{n}', np.round(s), y))  # a handful of distinct values
    cases.append((f'ties2_{n}', (s > 0.5).astype(float), y))  # two values
  y = rng.random(200) < 0.3
  y[:2] = [True, False]
  cases += [
    ('constant', np.full(200, 0.7), y),
    ('perfect', y.astype(float) + 0.01 * rng.random(200), y),
    ('inverted', -y.astype(float), y),
    ('int_scores', rng.integers(0, 4, 200), y.astype(int)),
    ('float32', rng.standard_normal(200).astype(np.float32), y),
    ('one_pos', rng.random(100), np.arange(100) == 37),
    ('one_neg', rng.random(100), np.arange(100) != 37),
  ]
  return cases


@pytest.mark.parametrize('name,scores,labels', _binary_cases(), ids=lambda v: v if isinstance(v, str) else '')
def test_image_metrics_match_sklearn(name, scores, labels):
  assert metrics.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
  assert metrics.image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=TOL)
  assert metrics.f1_max(scores, labels) == pytest.approx(sk_f1_max(scores, labels), abs=TOL)


def test_adversarial_values():
  y = np.array([0, 0, 1, 1, 0, 1])
  assert metrics.image_auroc(y.astype(float), y) == 1.0
  assert metrics.image_auroc(-y.astype(float), y) == 0.0
  assert metrics.image_auroc(np.zeros(6), y) == 0.5
  assert metrics.image_ap(y.astype(float), y) == 1.0
  assert metrics.image_ap(np.zeros(6), y) == pytest.approx(0.5)
  assert metrics.f1_max(y.astype(float), y) == 1.0
  assert metrics.f1_max(np.zeros(6), y) == pytest.approx(2 * 0.5 / 1.5)


@pytest.mark.parametrize('decimals', [None, 1, 0])
def test_pixel_metrics_match_sklearn(decimals):
  rng = np.random.default_rng(decimals or 5)
  masks = random_masks(rng, 6, 20, 24)
  maps = random_maps(rng, masks, decimals)
  s, y = maps.ravel(), masks.ravel()
  assert metrics.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=TOL)
  assert metrics.pixel_ap(maps, masks) == pytest.approx(average_precision_score(y, s), abs=TOL)
  assert metrics.pixel_f1_max(maps, masks) == pytest.approx(sk_f1_max(s, y), abs=TOL)
  # {0,1} integer masks and float32 maps are accepted too.
  m32 = maps.astype(np.float32)
  assert metrics.pixel_auroc(m32, masks.astype(np.uint8)) == pytest.approx(
    roc_auc_score(y, m32.ravel()), abs=TOL
  )


def test_parallel_chunked_sort_matches(monkeypatch):
  """The threaded chunked sort (used for big inputs) gives the same answers."""
  rng = np.random.default_rng(3)
  masks = random_masks(rng, 8, 32, 32)
  maps = np.round(random_maps(rng, masks), 2).astype(np.float32)
  serial = metrics.compute_all(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
  monkeypatch.setattr(metrics, '_PARALLEL_SORT_MIN', 16)
  monkeypatch.setattr(metrics.os, 'cpu_count', lambda: 5)
  chunked = metrics.compute_all(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
  assert chunked.keys() == serial.keys()
  for k in serial:
    assert chunked[k] == pytest.approx(serial[k], abs=1e-12), k
  s, y = maps.ravel(), masks.ravel()
  assert chunked['pixel_auroc'] == pytest.approx(roc_auc_score(y, s), abs=TOL)
  assert chunked['pixel_ap'] == pytest.approx(average_precision_score(y, s), abs=TOL)


# ----------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  'seed,decimals,fpr_limit',
  [(0, None, 0.3), (1, 1, 0.3), (2, 0, 0.3), (3, 2, 0.05), (4, None, 1.0), (5, 1, 0.5)],
)
def test_aupro_matches_reference(seed, decimals, fpr_limit):
  rng = np.random.default_rng(seed)
  masks = random_masks(rng, 4, 16, 18)
  maps = random_maps(rng, masks, decimals)
  ref = reference_aupro(maps, masks, fpr_limit)
  assert metrics.aupro(maps, masks, fpr_limit) == pytest.approx(ref, abs=TOL)


def test_pro_curve_matches_reference_points():
  rng = np.random.default_rng(11)
  masks = random_masks(rng, 3, 12, 12)
  maps = random_maps(rng, masks, 1)
  fpr, pro = metrics.pro_curve(maps, masks)
  rf, rp = reference_pro_curve(maps, masks)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
  # Every reference point lies on our polyline and vice versa.
  for xs, ys, xq, yq in ((fpr, pro, rf, rp), (rf, rp, fpr, pro)):
    for x, y in zip(xq, yq):
      on = np.flatnonzero(np.isclose(xs, x, atol=1e-12))
      if on.size:  # our curve may hold several points at one FPR (vertical step)
        assert ys[on].min() - 1e-12 <= y <= ys[on].max() + 1e-12
      else:
        assert y == pytest.approx(np.interp(x, xs, ys), abs=1e-12)


def test_aupro_hand_checked():
  # One row: two anomalous pixels (one region), four normal pixels.
  mask = np.array([[1, 1, 0, 0, 0, 0]], bool)
  amap = np.array([[0.9, 0.5, 0.8, 0.4, 0.3, 0.2]])
  # Curve: (0,0) (0,.5) (.25,.5) (.25,1) ... (1,1).
  assert metrics.aupro(amap, mask, 1.0) == pytest.approx(0.875, abs=TOL)
  assert metrics.aupro(amap, mask, 0.3) == pytest.approx((0.125 + 0.05) / 0.3, abs=TOL)
  assert metrics.aupro(amap, mask, 0.2) == pytest.approx(0.5, abs=TOL)
  # Tie between a positive and a negative: diagonal segment, interpolated at 0.3.
  mask = np.array([[1, 0, 0]], bool)
  amap = np.array([[0.5, 0.5, 0.1]])
  # Curve (0,0) -> (.5,1) -> (1,1); at FPR .3, PRO = .6; area .09.
  assert metrics.aupro(amap, mask, 0.3) == pytest.approx(0.3, abs=TOL)


def test_aupro_perfect_equal_inverted():
  rng = np.random.default_rng(7)
  masks = random_masks(rng, 5, 16, 16)
  perfect = masks * (1 + rng.random(masks.shape)) - (~masks) * rng.random(masks.shape)
  assert metrics.aupro(perfect, masks) == pytest.approx(1.0, abs=TOL)
  assert metrics.aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=TOL)
  assert metrics.aupro(1.0 - masks, masks) == pytest.approx(0.0, abs=TOL)
  assert metrics.aupro(-perfect, masks) == pytest.approx(0.0, abs=TOL)
  assert metrics.pixel_auroc(perfect, masks) == 1.0
  assert metrics.pixel_ap(perfect, masks) == 1.0
  assert metrics.pixel_f1_max(perfect, masks) == 1.0


def test_aupro_uses_8_connectivity_and_per_region_mean():
  mask = np.zeros((1, 6, 6), bool)
  mask[0, 1, 1] = mask[0, 2, 2] = True  # diagonal pair: one region under 8-connectivity
  mask[0, 4, 4] = True  # a second region
  amap = np.zeros((1, 6, 6))
  amap[0, 1, 1] = amap[0, 4, 4] = 2.0
  amap[0, 2, 2] = 1.0
  _, pro = metrics.pro_curve(amap, mask)
  assert np.any(np.isclose(pro, 0.75))  # mean(1/2, 1): 8-connected
  assert not np.any(np.isclose(pro, 2 / 3))  # mean(1, 0, 1) would be 4-connected
  # Regions weigh equally regardless of size: a big region found, a small one missed.
  mask = np.zeros((2, 8, 8), bool)
  mask[0, :4, :4] = True
  mask[1, 0, 0] = True
  amap = np.where(mask, 1.0, 0.0)
  amap[1, 0, 0] = -1.0  # below every normal pixel
  _, pro = metrics.pro_curve(amap, mask)
  assert np.any(np.isclose(pro, 0.5))


# ----------------------------------------------------------------------------
# compute_all, undefined metrics, input checking
# ----------------------------------------------------------------------------

KEYS = {'image_auroc', 'image_ap', 'f1_max', 'pixel_auroc', 'pixel_ap', 'pixel_f1_max', 'aupro'}


def test_compute_all_matches_individual_metrics():
  rng = np.random.default_rng(9)
  masks = random_masks(rng, 10, 16, 16, p_anomalous=0.5)
  maps = random_maps(rng, masks, 1).astype(np.float32)
  labels = masks.any(axis=(1, 2))
  scores = maps.max(axis=(1, 2))
  res = metrics.compute_all(scores, labels, maps, masks)
  assert set(res) == KEYS
  assert all(isinstance(v, float) for v in res.values())
  assert res['image_auroc'] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
  assert res['image_ap'] == pytest.approx(average_precision_score(labels, scores), abs=TOL)
  assert res['f1_max'] == pytest.approx(sk_f1_max(scores, labels), abs=TOL)
  assert res['pixel_auroc'] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=TOL)
  assert res['pixel_ap'] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=TOL)
  assert res['pixel_f1_max'] == pytest.approx(sk_f1_max(maps.ravel(), masks.ravel()), abs=TOL)
  assert res['aupro'] == pytest.approx(reference_aupro(maps, masks), abs=TOL)


def test_all_normal_gives_nan():
  rng = np.random.default_rng(0)
  maps = rng.random((3, 8, 8))
  masks = np.zeros((3, 8, 8), bool)
  res = metrics.compute_all(maps.max(axis=(1, 2)), np.zeros(3, bool), maps, masks)
  assert set(res) == KEYS
  assert all(np.isnan(v) for v in res.values())
  assert np.isnan(metrics.image_auroc([0.1, 0.2], [0, 0]))
  assert np.isnan(metrics.image_ap([0.1, 0.2], [0, 0]))
  assert np.isnan(metrics.f1_max([0.1, 0.2], [0, 0]))
  assert np.isnan(metrics.pixel_auroc(maps, masks))
  assert np.isnan(metrics.pixel_ap(maps, masks))
  assert np.isnan(metrics.pixel_f1_max(maps, masks))
  assert np.isnan(metrics.aupro(maps, masks))


def test_all_anomalous_gives_nan_only_where_undefined():
  rng = np.random.default_rng(1)
  maps = rng.random((2, 4, 4))
  masks = np.ones((2, 4, 4), bool)
  res = metrics.compute_all([0.3, 0.9], [1, 1], maps, masks)
  assert np.isnan(res['image_auroc']) and np.isnan(res['pixel_auroc']) and np.isnan(res['aupro'])
  assert res['image_ap'] == 1.0 and res['f1_max'] == 1.0
  assert res['pixel_ap'] == 1.0 and res['pixel_f1_max'] == 1.0


def test_normal_images_only_add_false_positives():
  """Images without defects contribute normal pixels to the FPR and nothing else."""
  rng = np.random.default_rng(2)
  masks = random_masks(rng, 4, 10, 10, p_anomalous=1.0)
  masks[2] = False
  maps = random_maps(rng, masks, 1)
  assert metrics.aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=TOL)


def test_single_2d_map_is_one_image():
  rng = np.random.default_rng(4)
  masks = random_masks(rng, 1, 12, 12, p_anomalous=1.0)
  maps = random_maps(rng, masks, 1)
  assert metrics.aupro(maps[0], masks[0]) == pytest.approx(metrics.aupro(maps, masks), abs=0)


def test_input_validation():
  with pytest.raises(ValueError):
    metrics.image_auroc([0.1, np.nan], [0, 1])
  with pytest.raises(ValueError):
    metrics.image_auroc([0.1, 0.2, 0.3], [0, 1])
  with pytest.raises(ValueError):
    metrics.pixel_auroc(np.zeros((2, 4, 4)), np.full((2, 4, 4), 255, np.uint8))
  with pytest.raises(ValueError):
    metrics.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool))
  with pytest.raises(ValueError):
    metrics.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool), fpr_limit=0.0)
  with pytest.raises(ValueError):
    metrics.aupro(np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4, 4), bool))
