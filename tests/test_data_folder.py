"""Tests for jaxad.data.folder (MVTec-layout image folders)."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REALAD
from PIL import Image

from jaxad.data import folder
from jaxad.data.folder import DatasetError


def _save(path, image):
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path)
  return str(path)


def _rgb(h=12, w=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def mvtec(tmp_path):
  """A small MVTec-layout tree with many image modes and formats."""
  root = tmp_path / 'ds'
  tr = root / 'cat_a' / 'train' / 'good'
  _save(tr / '000.png', Image.fromarray(_rgb()))
  _save(tr / '001.png', Image.fromarray(_rgb()[..., 0]))  # L
  _save(tr / '002.png', Image.fromarray(np.dstack([_rgb(), np.zeros((12, 16), np.uint8)])))
  _save(tr / '003.png', Image.fromarray(np.full((12, 16), 65535, np.uint16)))  # I;16
  _save(tr / '004.png', Image.fromarray(_rgb()).convert('P'))
  _save(tr / '005.bmp', Image.fromarray(_rgb(seed=5)))
  _save(tr / '006.jpg', Image.fromarray(_rgb(seed=6)))
  _save(tr / '007.tif', Image.fromarray(_rgb(seed=7)))
  _save(tr / '008.PNG', Image.fromarray(_rgb(seed=8)))  # upper-case extension
  (tr / 'notes.txt').write_text('not an image')
  (tr / '.hidden.png').write_bytes(b'')
  te = root / 'cat_a' / 'test'
  gt = root / 'cat_a' / 'ground_truth'
  _save(te / 'good' / '000.png', Image.fromarray(_rgb(seed=10)))
  _save(te / 'scratch' / '000.png', Image.fromarray(_rgb(seed=11)))
  _save(te / 'scratch' / '001.jpg', Image.fromarray(_rgb(24, 32, seed=12)))
  _save(te / 'crack' / '000.png', Image.fromarray(_rgb(seed=13)))
  m = np.zeros((12, 16), np.uint8)
  m[2:6, 3:9] = 255
  _save(gt / 'scratch' / '000_mask.png', Image.fromarray(m))
  big = np.zeros((24, 32), np.uint8)
  big[:12, :16] = 255
  _save(gt / 'scratch' / '001_mask.png', Image.fromarray(big))
  _save(gt / 'crack' / '000_mask.PNG', Image.fromarray(m))
  _save(root / 'cat_b' / 'train' / 'good' / '000.png', Image.fromarray(_rgb()))
  (root / 'not_a_category').mkdir()
  return root


def test_list_and_resolve_categories(mvtec):
  assert folder.list_categories(mvtec) == ['cat_a', 'cat_b']
  assert folder.resolve_categories(mvtec, 'all') == ['cat_a', 'cat_b']
  assert folder.resolve_categories(mvtec, ('cat_b',)) == ['cat_b']
  assert folder.resolve_categories(mvtec, 'cat_a') == ['cat_a']
  assert folder.resolve_categories(mvtec, 'cat_b, cat_a') == ['cat_b', 'cat_a']  # Command line form.
  with pytest.raises(DatasetError, match='nope'):
    folder.resolve_categories(mvtec, ['cat_a', 'nope'])
  with pytest.raises(DatasetError, match='not_a_category'):
    folder.resolve_categories(mvtec, ['not_a_category'])


def test_list_categories_errors(tmp_path):
  with pytest.raises(DatasetError, match='does not exist'):
    folder.list_categories(tmp_path / 'missing')
  (tmp_path / 'x').mkdir()
  with pytest.raises(DatasetError, match=str(tmp_path)):
    folder.list_categories(tmp_path)


def test_scan_train(mvtec):
  s = folder.scan_split(mvtec, 'cat_a', 'train')
  names = [os.path.basename(x.image_path) for x in s]
  assert names == [
    '000.png',
    '001.png',
    '002.png',
    '003.png',
    '004.png',
    '005.bmp',
    '006.jpg',
    '007.tif',
    '008.PNG',
  ]
  assert all(
    x.label == 0 and x.defect_type == 'good' and x.mask_path is None and x.category == 'cat_a' for x in s
  )
  assert s == folder.scan_split(str(mvtec), 'cat_a', 'train')  # deterministic


def test_scan_test(mvtec):
  s = folder.scan_split(mvtec, 'cat_a', 'test')
  got = [
    (x.defect_type, os.path.basename(x.image_path), x.label, x.mask_path and os.path.basename(x.mask_path))
    for x in s
  ]
  assert got == [
    ('crack', '000.png', 1, '000_mask.PNG'),
    ('good', '000.png', 0, None),
    ('scratch', '000.png', 1, '000_mask.png'),
    ('scratch', '001.jpg', 1, '001_mask.png'),
  ]
  for x in s:
    if x.mask_path:
      assert os.path.exists(x.mask_path)
  with pytest.raises(DatasetError, match='split'):
    folder.scan_split(mvtec, 'cat_a', 'val')


def test_load_image_conversions(mvtec):
  tr = mvtec / 'cat_a' / 'train' / 'good'
  rgb = _rgb()
  x = folder.load_image(tr / '000.png', (12, 16))
  assert x.dtype == np.float32 and x.shape == (12, 16, 3)
  np.testing.assert_allclose(x, rgb / 255.0, atol=1e-6)
  # Gray is replicated.
  g = folder.load_image(tr / '001.png', (12, 16))
  np.testing.assert_allclose(g, np.repeat(rgb[..., :1], 3, -1) / 255.0, atol=1e-6)
  # RGBA with alpha 0: alpha dropped, NOT composited on black.
  a = folder.load_image(tr / '002.png', (12, 16))
  np.testing.assert_allclose(a, rgb / 255.0, atol=1e-6)
  # 16-bit: 65535 -> 1.0
  h = folder.load_image(tr / '003.png', (12, 16))
  np.testing.assert_allclose(h, 1.0)
  # Palette -> RGB of the palette entries.
  p = folder.load_image(tr / '004.png', (12, 16))
  expect = np.asarray(Image.open(tr / '004.png').convert('RGB')) / 255.0
  np.testing.assert_allclose(p, expect, atol=1e-6)
  # channels=1 -> PIL 'L' luminance.
  one = folder.load_image(tr / '000.png', (12, 16), channels=1)
  assert one.shape == (12, 16, 1)
  expect = np.asarray(Image.fromarray(rgb).convert('L')) / 255.0
  np.testing.assert_allclose(one[..., 0], expect, atol=1e-6)
  # Every file loads and resizes to any size.
  for s in folder.scan_split(mvtec, 'cat_a', 'train'):
    for size, shape in ((8, (8, 8, 3)), ((10, 20), (10, 20, 3))):
      y = folder.load_image(s.image_path, size)
      assert y.shape == shape and y.dtype == np.float32
      assert 0.0 <= y.min() and y.max() <= 1.0


def test_load_image_high_bit_and_other_modes(tmp_path):
  vals = np.array([[0, 32768, 65535]], np.uint16)
  p16 = _save(tmp_path / 'a.png', Image.fromarray(vals))
  p16b = str(tmp_path / 'b.tif')
  Image.frombytes('I;16B', (3, 1), vals.astype('>u2').tobytes()).save(p16b)
  p32 = _save(tmp_path / 'c.tif', Image.fromarray(vals.astype(np.int32)))  # mode I
  assert Image.open(p16b).mode == 'I;16B' and Image.open(p32).mode == 'I'
  for p in (p16, p16b, p32):
    x = folder.load_image(p, (1, 3))
    np.testing.assert_allclose(x[0, :, 0], [0.0, 32768 / 65535, 1.0], atol=1e-6)
    assert (x[..., 0] == x[..., 2]).all()
  la = _save(tmp_path / 'la.png', Image.new('LA', (4, 4), (100, 7)))
  np.testing.assert_allclose(folder.load_image(la, 4), 100 / 255, atol=1e-6)
  bw = _save(tmp_path / 'bw.png', Image.new('1', (4, 4), 1))
  np.testing.assert_allclose(folder.load_image(bw, 4), 1.0)
  cmyk = _save(tmp_path / 'cmyk.tif', Image.new('CMYK', (4, 4), (0, 255, 0, 0)))
  np.testing.assert_allclose(folder.load_image(cmyk, 4)[0, 0], [1, 0, 1], atol=1e-6)
  # Bilinear downsizing of a uniform image stays uniform.
  u = _save(tmp_path / 'u.png', Image.new('RGB', (50, 30), (10, 20, 30)))
  np.testing.assert_allclose(folder.load_image(u, (7, 9)), np.full((7, 9, 3), [10, 20, 30]) / 255, atol=1e-6)


def test_load_mask(mvtec):
  gt = mvtec / 'cat_a' / 'ground_truth' / 'scratch'
  m = folder.load_mask(gt / '000_mask.png', (12, 16))
  assert m.dtype == np.uint8 and m.shape == (12, 16)
  assert set(np.unique(m)) == {0, 1} and m.sum() == 4 * 6
  big = folder.load_mask(gt / '001_mask.png', (12, 16))  # twice the size
  assert set(np.unique(big)) == {0, 1} and big[:6, :8].all() and not big[6:].any()
  assert folder.load_mask(gt / '000_mask.png', 48).shape == (48, 48)


def test_btad_layout(tmp_path):
  root = tmp_path / 'btad'
  _save(root / '01' / 'train' / 'ok' / '0000.bmp', Image.fromarray(_rgb()))
  _save(root / '01' / 'train' / 'ok' / '0001.bmp', Image.fromarray(_rgb()))
  _save(root / '01' / 'test' / 'ok' / '0000.bmp', Image.fromarray(_rgb()))
  _save(root / '01' / 'test' / 'ko' / '0000.bmp', Image.fromarray(_rgb()))
  _save(root / '01' / 'test' / 'ko' / '0001.bmp', Image.fromarray(_rgb()))
  m = np.zeros((12, 16), np.uint8)
  m[1:3, 1:3] = 255
  _save(root / '01' / 'ground_truth' / 'ko' / '0000.bmp', Image.fromarray(m))
  _save(root / '01' / 'ground_truth' / 'ko' / '0001.png', Image.fromarray(m))
  kw = dict(good_name='ok', mask_suffix='')
  assert len(folder.scan_split(root, '01', 'train', **kw)) == 2
  s = folder.scan_split(root, '01', 'test', **kw)
  assert [(x.defect_type, x.label) for x in s] == [('good', 0), ('ko', 1), ('ko', 1)]
  assert [os.path.basename(x.mask_path) for x in s[1:]] == ['0000.bmp', '0001.png']
  assert folder.load_mask(s[1].mask_path, 12).sum() > 0
  with pytest.raises(DatasetError):  # default good folder name does not exist
    folder.scan_split(root, '01', 'train')


def test_corrupt_files(tmp_path):
  good = _save(tmp_path / 'ok.png', Image.fromarray(_rgb(64, 64)))
  data = Path(good).read_bytes()
  bad = tmp_path / 'truncated.png'
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(DatasetError, match='truncated.png'):
    folder.load_image(bad, 32)
  with pytest.raises(DatasetError, match='truncated.png'):
    folder.load_mask(bad, 32)
  fake = tmp_path / 'fake.jpg'
  fake.write_text('this is text, not a jpeg')
  with pytest.raises(DatasetError, match='fake.jpg'):
    folder.load_image(fake, 32)
  with pytest.raises(DatasetError, match='missing.png'):
    folder.load_image(tmp_path / 'missing.png', 32)


def test_missing_mask_names_image_and_expected_mask(mvtec):
  os.remove(mvtec / 'cat_a' / 'ground_truth' / 'scratch' / '001_mask.png')
  with pytest.raises(DatasetError) as e:
    folder.scan_split(mvtec, 'cat_a', 'test')
  msg = str(e.value)
  assert os.path.join('test', 'scratch', '001.jpg') in msg
  assert os.path.join('ground_truth', 'scratch', '001_mask.png') in msg


def test_empty_or_missing_folders(mvtec):
  empty = mvtec / 'cat_c' / 'train' / 'good'
  empty.mkdir(parents=True)
  (empty / 'readme.txt').write_text('no images here')
  with pytest.raises(DatasetError, match=str(mvtec / 'cat_c' / 'train')):
    folder.scan_split(mvtec, 'cat_c', 'train')
  with pytest.raises(DatasetError, match=str(mvtec / 'cat_c' / 'test')):
    folder.scan_split(mvtec, 'cat_c', 'test')
  with pytest.raises(DatasetError, match='cat_zzz'):
    folder.scan_split(mvtec, 'cat_zzz', 'train')


@pytest.mark.skipif(not REALAD.is_dir(), reason='the real datasets ($JAXAD_REALAD) are absent')
def test_real_mvtec_bottle():
  root = REALAD / 'mvtec_ad'
  assert 'bottle' in folder.list_categories(root)
  train = folder.scan_split(root, 'bottle', 'train')
  test = folder.scan_split(root, 'bottle', 'test')
  assert len(train) == 209 and len(test) == 83
  bad = [s for s in test if s.label == 1]
  assert len(bad) == 63
  assert all(s.mask_path and os.path.isfile(s.mask_path) for s in bad)
  assert {s.defect_type for s in test} == {'good', 'broken_large', 'broken_small', 'contamination'}
  x = folder.load_image(bad[0].image_path, 64)
  m = folder.load_mask(bad[0].mask_path, 64)
  assert x.shape == (64, 64, 3) and m.shape == (64, 64) and m.any()


@pytest.mark.skipif(not REALAD.is_dir(), reason='the real datasets ($JAXAD_REALAD) are absent')
def test_real_magnetic_tile():
  root = REALAD / 'mtd'
  test = folder.scan_split(root, 'magnetic_tile', 'test')
  assert len(folder.scan_split(root, 'magnetic_tile', 'train')) == 100
  assert len(test) == 120
  empty_at_64 = 0
  for s in test[::3] + [t for t in test if t.label][::4]:
    native = Image.open(s.image_path).size
    assert Image.open(s.image_path).mode == 'L'
    x = folder.load_image(s.image_path, 64)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    assert np.array_equal(x[..., 0], x[..., 2])
    if s.label:
      assert folder.load_mask(s.mask_path, native[::-1]).any()  # at native size
      empty_at_64 += not folder.load_mask(s.mask_path, 64).any()
  # NEAREST downsizing may drop a few-pixel defect; nearly all must survive.
  assert empty_at_64 <= 1


def test_check_samples_accepts_the_fixture(mvtec):
  samples = folder.scan_split(mvtec, 'cat_a', 'train') + folder.scan_split(mvtec, 'cat_a', 'test')
  assert folder.check_samples(samples) == []
  for s in samples:
    image, mask = folder.load_pair(s.image_path, s.mask_path, (6, 8))
    assert image.shape == (6, 8, 3) and mask.shape == (6, 8) and mask.dtype == np.uint8
    np.testing.assert_array_equal(image, folder.load_image(s.image_path, (6, 8)))
    if s.mask_path:
      np.testing.assert_array_equal(mask, folder.load_mask(s.mask_path, (6, 8)))
      np.testing.assert_array_equal(mask, folder.load_mask(s.mask_path, (6, 8), image_path=s.image_path))
    else:
      assert not mask.any()


def test_mask_size_mismatch_names_both_files_and_sizes(mvtec):
  gt = mvtec / 'cat_a' / 'ground_truth' / 'scratch'
  m = np.zeros((12, 20), np.uint8)  # the image is 12x16 (HxW)
  m[2:6, 3:9] = 255
  mask = _save(gt / '000_mask.png', Image.fromarray(m))
  image = str(mvtec / 'cat_a' / 'test' / 'scratch' / '000.png')
  samples = folder.scan_split(mvtec, 'cat_a', 'test')
  with pytest.raises(DatasetError) as e:
    folder.check_samples(samples)
  for text in (mask, image, '20x12', '16x12'):
    assert text in str(e.value)
  for load in (
    lambda: folder.load_mask(mask, 8, image_path=image),
    lambda: folder.load_pair(image, mask, 8),
  ):
    with pytest.raises(DatasetError) as e:
      load()
    for text in (mask, image, '20x12', '16x12'):
      assert text in str(e.value)


def test_unreadable_files_are_named_by_check_samples(mvtec):
  te = mvtec / 'cat_a' / 'test'
  data = (te / 'crack' / '000.png').read_bytes()
  (te / 'crack' / '000.png').write_bytes(data[: len(data) // 2])
  (mvtec / 'cat_a' / 'ground_truth' / 'scratch' / '000_mask.png').write_text('not a png')
  with pytest.raises(DatasetError) as e:
    folder.check_samples(folder.scan_split(mvtec, 'cat_a', 'test'))
  assert str(te / 'crack' / '000.png') in str(e.value)
  assert str(mvtec / 'cat_a' / 'ground_truth' / 'scratch' / '000_mask.png') in str(e.value)


def test_exif_orientation_applies_to_images_and_masks(tmp_path):
  upright = np.zeros((32, 48), np.uint8)
  upright[:16, :24] = 255
  stored = Image.fromarray(np.dstack([upright] * 3)).transpose(Image.Transpose.ROTATE_90)
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 CW to display.
  image = str(tmp_path / 'test' / 'bad' / '000.jpg')
  os.makedirs(os.path.dirname(image))
  stored.save(image, quality=95, exif=exif)
  assert Image.open(image).size == (32, 48)
  mask = _save(tmp_path / 'mask.png', Image.fromarray(upright))
  x = folder.load_image(image, (32, 48))
  m = folder.load_mask(mask, (32, 48))
  np.testing.assert_array_equal(x.mean(-1) > 0.5, m.astype(bool))
  np.testing.assert_array_equal(folder.load_mask(mask, (32, 48), image_path=image), m)
  assert folder.check_samples([folder.Sample(image, 'c', 'bad', 1, mask)]) == []
  x2, m2 = folder.load_pair(image, mask, (32, 48))
  np.testing.assert_array_equal(x2, x)
  np.testing.assert_array_equal(m2, m)
  # A rotated mask is turned upright too.
  rotated_mask = str(tmp_path / 'mask_rotated.png')
  Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(rotated_mask, exif=exif)
  np.testing.assert_array_equal(folder.load_mask(rotated_mask, (32, 48), image_path=image), m)


def test_mask_binarised_at_half_the_maximum(tmp_path):
  defect = np.zeros((16, 24), bool)
  defect[5:13, 3:11] = True  # across JPEG block edges: ringing on both sides
  noise = np.random.default_rng(0).integers(1, 21, defect.shape)
  cases = {
    'noisy.png': Image.fromarray(np.where(defect, 255, noise).astype(np.uint8)),
    'edge.png': Image.fromarray(np.where(defect, 128, 127).astype(np.uint8)),
    'rgb.png': Image.fromarray(np.dstack([noise, np.where(defect, 200, noise), noise]).astype(np.uint8)),
    'palette.png': Image.fromarray(np.where(defect, 255, noise).astype(np.uint8)).convert('P'),
    'sixteen.png': Image.fromarray(np.where(defect, 32768, 32767).astype(np.uint16)),
    'float.tif': Image.fromarray(np.where(defect, 0.5, 0.49).astype(np.float32)),
    'bits.png': Image.fromarray(defect),
    'lossy.jpg': Image.fromarray(np.where(defect, 255, 0).astype(np.uint8)),  # saved at quality 75
  }
  for name, im in cases.items():
    path = _save(tmp_path / name, im)
    if name == 'lossy.jpg':
      raw = np.asarray(Image.open(path))
      assert (raw[~defect] > 0).any() and raw[~defect].max() < 128 <= raw[defect].min()
    np.testing.assert_array_equal(folder.load_mask(path, (16, 24)), defect, err_msg=name)
  # 0/255 masks are read exactly as before: every nonzero pixel is defect.
  exact = np.where(defect, 255, 0).astype(np.uint8)
  path = _save(tmp_path / 'exact.png', Image.fromarray(exact))
  np.testing.assert_array_equal(folder.load_mask(path, (16, 24)), exact != 0)
  np.testing.assert_array_equal(
    folder.load_mask(path, (7, 5)), np.array(Image.fromarray(exact != 0).resize((5, 7), Image.NEAREST))
  )


def test_empty_defect_mask_is_warned_about(mvtec, caplog):
  gt = mvtec / 'cat_a' / 'ground_truth'
  _save(gt / 'crack' / '000_mask.PNG', Image.fromarray(np.zeros((12, 16), np.uint8)))
  faint = np.zeros((12, 16), np.uint8)
  faint[2:6, 3:9] = 40  # Below the threshold of 128: nothing is defect.
  _save(gt / 'scratch' / '000_mask.png', Image.fromarray(faint))
  with caplog.at_level(logging.WARNING):
    warnings = folder.check_samples(folder.scan_split(mvtec, 'cat_a', 'test'))
  assert len(warnings) == 2
  assert str(gt / 'crack' / '000_mask.PNG') in warnings[0] and 'all zero' in warnings[0]
  assert str(gt / 'scratch' / '000_mask.png') in warnings[1] and 'max value 40' in warnings[1]
  assert str(gt / 'crack' / '000_mask.PNG') in caplog.text
  assert str(gt / 'scratch' / '000_mask.png') in caplog.text
  ones = np.zeros((12, 16), np.uint8)
  ones[2:6, 3:9] = 1  # A 0/1 label mask: its 1s are defect.
  _save(gt / 'scratch' / '000_mask.png', Image.fromarray(ones))
  np.testing.assert_array_equal(folder.load_mask(str(gt / 'scratch' / '000_mask.png'), (12, 16)), ones)
  assert len(folder.check_samples(folder.scan_split(mvtec, 'cat_a', 'test'))) == 1


def test_dangling_symlink_is_an_error(mvtec):
  link = mvtec / 'cat_a' / 'train' / 'good' / '009.png'
  os.symlink(mvtec / 'gone.png', link)
  with pytest.raises(DatasetError, match='009.png.*dangling'):
    folder.scan_split(mvtec, 'cat_a', 'train')
  mask = mvtec / 'cat_a' / 'ground_truth' / 'crack' / '000_mask.PNG'
  os.remove(mask)
  os.symlink(mvtec / 'gone.png', mask)
  with pytest.raises(DatasetError, match='000_mask.PNG.*dangling'):
    folder.scan_split(mvtec, 'cat_a', 'test')
  os.symlink(mvtec / 'gone', mvtec / 'cat_a' / 'test' / 'hole')
  with pytest.raises(DatasetError, match='hole.*dangling'):
    folder.scan_split(mvtec, 'cat_a', 'test')


def test_folder_without_train_is_warned_about(mvtec, caplog):
  (mvtec / 'license.txt').write_text('files are not categories')
  with caplog.at_level(logging.WARNING):
    assert folder.resolve_categories(mvtec, 'all') == ['cat_a', 'cat_b']
  assert str(mvtec / 'not_a_category') in caplog.text and 'train' in caplog.text
  assert 'license.txt' not in caplog.text
