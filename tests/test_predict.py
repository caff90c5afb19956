"""python -m jaxad.predict: scores, outputs, unreadable files, other image sizes, folder labels."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sklearn.metrics
from conftest import REPO, override, tiny_folder_config
from PIL import Image

import jaxad
from jaxad import evaluate, parallel, predict, train
from jaxad.data import pipeline


@pytest.fixture(scope='module')
def trained(tiny_dataset, tmp_path_factory):
  """A unified tiny mean-image detector over both categories (scored by max_zscore)."""
  from configs import mean_image

  config = override(
    tiny_folder_config(mean_image.get_config(), tiny_dataset),
    num_heatmaps=0,
    image_score='max_zscore',
    **{'dataset.unified': True},
  )
  workdir = tmp_path_factory.mktemp('predict_run')
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


def test_rows_are_the_evaluation_scores_and_maps_and_need_a_category(trained, tiny_dataset):
  """predict's scores and maps are those the harness's evaluation computes for the same test images."""
  detector = jaxad.load(trained)
  category = detector.categories[0]
  samples = pipeline.scan(detector.config, tiny_dataset, category, 'test')
  paths = [s.image_path for s in samples]
  maps = {}
  rows = predict.predict_paths(  # Category from the path.
    detector,
    paths,
    batch_size=3,
    on_scored=lambda row, original, amap, mask: maps.update({row['path']: amap}),
  )
  run = detector._runs[category]
  scored = evaluate.score_samples(
    detector.config, run.model, run.state, run.frozen, samples, parallel.make_mesh()
  )
  want_scores = detector.calibrations[category].image_scores(scored['maps'], scored['scores'])
  np.testing.assert_allclose([r['score'] for r in rows], want_scores, rtol=1e-6)
  np.testing.assert_allclose(np.stack([maps[p] for p in paths]), scored['maps'], rtol=1e-6, atol=1e-7)
  threshold = detector.calibrations[category].image_threshold
  assert [r['verdict'] == 'anomalous' for r in rows] == (want_scores >= threshold).tolist()
  with pytest.raises(ValueError, match='--category'):
    predict.category_of('/elsewhere/x.png', detector.categories, None)


def test_cli_names_unreadable_files_scores_the_rest_and_writes_every_output(trained, tiny_dataset, tmp_path):
  category = jaxad.load(trained).categories[0]
  inputs = tmp_path / 'in'
  shutil.copytree(f'{tiny_dataset}/{category}/test', inputs)
  (inputs / 'good' / 'broken.png').write_bytes(b'not an image')
  rgb = np.random.default_rng(0).integers(0, 255, (80, 100, 3), np.uint8)
  Image.fromarray(rgb).save(inputs / 'good' / 'wide.png')
  gray16 = (np.random.default_rng(1).random((50, 70)) * 65535).astype(np.uint16)
  Image.fromarray(gray16).save(inputs / 'good' / 'deep.png')
  out = tmp_path / 'out'
  cmd = [
    sys.executable,
    '-m',
    'jaxad.predict',
    f'--workdir={trained}',
    f'--input={inputs}',
    f'--output={out}',
  ]
  done = subprocess.run(
    [*cmd, f'--category={category}', '--masks', '--labels_from_folders'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 2, done.stderr[-3000:]
  assert 'broken.png' in done.stderr
  with open(out / 'predictions.csv') as f:
    rows = list(csv.DictReader(f))
  lines = [json.loads(line) for line in (out / 'predictions.jsonl').read_text().splitlines()]
  n = len(predict.input_paths(str(inputs)))
  assert len(rows) == len(lines) == n
  assert [r['path'] for r in rows] == [r['path'] for r in lines]
  broken = [r for r in lines if r['path'].endswith('broken.png')]
  assert len(broken) == 1 and broken[0]['error'] and broken[0]['score'] is None
  assert sum(1 for r in lines if not r['error']) == n - 1
  for r, j in zip(rows, lines):
    if not j['error']:
      assert float(r['score']) == pytest.approx(j['score'])
  # Pictures at each input's own size.
  assert Image.open(out / 'masks' / 'wide_mask.png').size == (100, 80)
  assert Image.open(out / 'masks' / 'deep_mask.png').size == (70, 50)
  assert len(list((out / 'overlays').glob('*.png'))) == n - 1
  # Verdict accuracy against the folders, as sklearn computes it.
  scored = [j for j in lines if not j['error']]
  truth = [j['path'].split('/')[-2] != 'good' for j in scored]
  said = [j['verdict'] == 'anomalous' for j in scored]
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['accuracy'] == pytest.approx(sklearn.metrics.accuracy_score(truth, said))
  assert summary['recall'] == pytest.approx(sklearn.metrics.recall_score(truth, said))
  # Without --category, a unified detector reads the category from the path: here none is named.
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and '--category' in done.stderr


def test_pictures_keep_16_bit_contrast_hidden_files_are_skipped_and_categories_checked(trained, tmp_path):
  detector = jaxad.load(trained)
  gray16 = np.tile(np.linspace(0, 65535, 40, dtype=np.uint16), (30, 1))
  Image.fromarray(gray16).save(tmp_path / 'deep.png')
  (tmp_path / '._deep.png').write_bytes(b'resource fork')  # macOS metadata, not an image.
  assert predict.input_paths(str(tmp_path)) == [str(tmp_path / 'deep.png')]
  _, original = predict._read(str(tmp_path / 'deep.png'), detector.image_size, detector.channels)
  assert original.shape == (30, 40, 3)
  np.testing.assert_allclose(original[0, :, 0], np.round(np.linspace(0, 255, 40)), atol=1)  # Not clipped.
  with pytest.raises(ValueError, match='Unknown category'):
    predict.predict_paths(detector, [str(tmp_path / 'deep.png')], category='nope')
