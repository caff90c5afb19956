"""Tests for jaxad.data.synthetic (the embedded default dataset)."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxad.data import folder, synthetic

SMALL = dict(image_size=64, num_train=2, num_test_good=1, num_test_defect=8)


def _tree_digest(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = Path(dirpath) / f
      out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def test_categories_and_defect_types():
  assert len(synthetic.CATEGORIES) >= 5
  assert 'ring_seal' in synthetic.CATEGORIES
  for cat in synthetic.CATEGORIES:
    assert len(synthetic.DEFECT_TYPES[cat]) >= 2
  assert {'broken_ring', 'missing_foil', 'off_centre'} <= set(synthetic.DEFECT_TYPES['ring_seal'])


def test_render_deterministic_and_seed_dependent():
  for cat in synthetic.CATEGORIES:
    split = 'test/' + synthetic.DEFECT_TYPES[cat][0]
    a = synthetic.render(cat, split, 3, seed=7, image_size=64)
    b = synthetic.render(cat, split, 3, seed=7, image_size=64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], synthetic.render(cat, split, 3, seed=8, image_size=64)[0])
    assert not np.array_equal(a[0], synthetic.render(cat, split, 4, seed=7, image_size=64)[0])
    g = synthetic.render(cat, 'train', 0, seed=7, image_size=64)
    assert g[1] is None and g[2] == 'good'
    assert g[0].dtype == np.uint8
    assert g[0].shape == ((64, 64) if cat == 'ring_seal' else (64, 64, 3))


def test_render_rejects_bad_arguments():
  with pytest.raises(ValueError, match='unknown'):
    synthetic.render('nope', 'train', 0, seed=0, image_size=32)
  with pytest.raises(ValueError, match='test/'):
    synthetic.render('weave', 'test/broken_ring', 0, seed=0, image_size=32)
  with pytest.raises(ValueError):
    synthetic.render('weave', 'test', 0, seed=0, image_size=32)


@pytest.mark.parametrize('category', synthetic.CATEGORIES)
def test_masks_are_exactly_the_altered_pixels(category):
  lo, hi = synthetic.AREA_RANGE
  for kind in synthetic.DEFECT_TYPES[category]:
    for index in range(3):
      img, mask, dt = synthetic.render(category, 'test/' + kind, index, seed=1, image_size=128)
      clean, mask2, _ = synthetic.render(category, 'test/' + kind, index, seed=1, image_size=128, clean=True)
      assert dt == kind and np.array_equal(mask, mask2)
      assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
      changed = img != clean
      if changed.ndim == 3:
        changed = changed.any(-1)
      assert np.array_equal(changed, mask > 0), (category, kind, index)
      assert lo <= (mask > 0).mean() <= hi, (category, kind, index, (mask > 0).mean())
      # The clean render is the image a normal sample would show: a defect never
      # touches the pixels outside its mask.
      assert np.array_equal(np.where(mask[..., None] > 0 if img.ndim == 3 else mask > 0, clean, img), clean)


def test_generate_is_byte_deterministic(tmp_path):
  a = synthetic.generate(tmp_path / 'a', seed=3, progress=False, **SMALL)
  b = synthetic.generate(tmp_path / 'b', seed=3, progress=False, **SMALL)
  c = synthetic.generate(tmp_path / 'c', seed=4, progress=False, **SMALL)
  da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
  assert da == db
  assert set(da) == set(dc)
  pngs = [k for k in da if k.endswith('.png')]
  assert all(da[k] != dc[k] for k in pngs if 'mask' not in k)
  # Layout, formats and naming.
  assert (Path(a) / 'README.txt').is_file() and (Path(a) / 'dataset.json').is_file()
  for cat in synthetic.CATEGORIES:
    im = Image.open(Path(a) / cat / 'train' / 'good' / '000.png')
    assert im.mode == ('L' if cat == 'ring_seal' else 'RGB') and im.size == (64, 64)
    kind = synthetic.DEFECT_TYPES[cat][0]
    m = Image.open(Path(a) / cat / 'ground_truth' / kind / '001_mask.png')
    assert m.mode == 'L' and set(np.unique(np.asarray(m))) == {0, 255}
    assert np.array_equal(np.asarray(m), synthetic.render(cat, 'test/' + kind, 1, seed=3, image_size=64)[1])


def test_ensure_is_idempotent_and_readable(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXAD_CACHE', str(tmp_path / 'env_cache'))
  root = synthetic.ensure(seed=0, progress=False, **SMALL)
  assert root.startswith(str(tmp_path / 'env_cache'))
  assert os.path.basename(root).startswith(f'synthetic-v{synthetic.VERSION}-')
  assert os.path.exists(os.path.join(root, '.complete'))
  probe = Path(root) / 'weave' / 'train' / 'good' / '000.png'
  mtime = probe.stat().st_mtime_ns
  assert synthetic.ensure(seed=0, progress=False, **SMALL) == root
  assert probe.stat().st_mtime_ns == mtime
  assert os.listdir(tmp_path / 'env_cache') == [os.path.basename(root)]  # no temp left
  other = synthetic.ensure(tmp_path / 'explicit', seed=1, progress=False, **SMALL)
  assert other != root and other.startswith(str(tmp_path / 'explicit'))

  assert folder.list_categories(root) == sorted(synthetic.CATEGORIES)
  for cat in synthetic.CATEGORIES:
    train = folder.scan_split(root, cat, 'train')
    test = folder.scan_split(root, cat, 'test')
    assert len(train) == 2 and len(test) == 1 + 8
    assert sum(s.label for s in test) == 8
    for s in test:
      if s.label:
        assert folder.load_mask(s.mask_path, 64).any()
      assert folder.load_image(s.image_path, 64).shape == (64, 64, 3)


def test_default_mask_areas(embedded_dataset):
  lo, hi = synthetic.AREA_RANGE
  for cat in synthetic.CATEGORIES:
    test = folder.scan_split(embedded_dataset, cat, 'test')
    assert sum(s.label for s in test) == 30 and len(test) == 45
    assert len({s.defect_type for s in test if s.label}) >= 2
    for s in test:
      if s.label:
        area = (np.asarray(Image.open(s.mask_path)) > 0).mean()
        assert lo <= area <= hi, (s.mask_path, area)


def test_mean_image_baseline_is_not_near_perfect(embedded_dataset):
  """Per-pixel L2 to the mean training image (score = max) must stay weak."""
  metrics = pytest.importorskip('sklearn.metrics')
  aurocs = {}
  for cat in synthetic.CATEGORIES:
    train = folder.scan_split(embedded_dataset, cat, 'train')
    mean = np.mean([folder.load_image(s.image_path, 256) for s in train], axis=0)
    labels, scores = [], []
    for s in folder.scan_split(embedded_dataset, cat, 'test'):
      x = folder.load_image(s.image_path, 256)
      scores.append(np.sqrt(((x - mean) ** 2).sum(-1)).max())
      labels.append(s.label)
    aurocs[cat] = metrics.roc_auc_score(labels, scores)
  avg = float(np.mean(list(aurocs.values())))
  assert avg < 0.9, aurocs
