"""python -m jaxad.export: artifacts that reproduce the checkpoint, and load without jaxad."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import override, tiny_folder_config, tiny_sivt_config

import jaxad
from jaxad import calibration, export, train


def _mean_image(root):
  from configs import mean_image

  return override(tiny_folder_config(mean_image.get_config(), root), num_heatmaps=0, image_score='max_zscore')


def _mask_vitgan(root):
  from configs import mask_vitgan

  c = tiny_folder_config(mask_vitgan.get_config(), root)
  return override(
    c,
    num_epochs=1,
    num_heatmaps=0,
    **{
      'mask_vitgan.depth': 3,
      'mask_vitgan.width': 32,
      'mask_vitgan.disc_depth': 1,
      'mask_vitgan.disc_width': 32,
      'mask_vitgan.disc_feature_dim': 16,
    },
  )


def _tmirn(root):
  from test_tmirn import _tiny_config

  return override(
    tiny_folder_config(_tiny_config(), root), num_epochs=1, num_heatmaps=0, **{'dataset.unified': False}
  )


def _rbae(root):
  from test_rbae import _tiny_config

  return override(_tiny_config(root), num_heatmaps=0)


def _vit_memae(root):
  from test_vit_memae import tiny_vit_memae_config

  return override(tiny_vit_memae_config(root), num_heatmaps=0)


CONFIGS = {
  'mean_image': _mean_image,
  'sivt': lambda root: tiny_sivt_config(root, num_heatmaps=0, **{'dataset.unified': False}),
  # ONNX: jax2onnx does not convert nn.scan with a symbolic batch, so SIVT unrolled.
  'sivt_unrolled': lambda root: tiny_sivt_config(
    root, num_heatmaps=0, **{'dataset.unified': False, 'sivt.scan_blocks': False}
  ),
  'mask_vitgan': _mask_vitgan,
  'tmirn': _tmirn,
  'rbae': _rbae,
  'vit_memae': _vit_memae,
}
# Every model's detector converts; these three train and compile for minutes on 2 cores.
NAMES = [
  pytest.param(n, marks=pytest.mark.slow) if n in ('tmirn', 'rbae', 'vit_memae') else n for n in CONFIGS
]
STABLEHLO_NAMES = [n for n in NAMES if n != 'sivt_unrolled']
ONNX_NAMES = [n for n in NAMES if n != 'sivt']


@pytest.fixture(scope='module')
def detectors(tiny_dataset, tmp_path_factory):
  """name -> the loaded detector of a tiny run of that model, trained on first use."""
  cache = {}

  def detector(name):
    if name not in cache:
      workdir = tmp_path_factory.mktemp(f'export_{name}')
      train.train_and_evaluate(CONFIGS[name](tiny_dataset), str(workdir))
      cache[name] = jaxad.load(str(workdir))
    return cache[name]

  return detector


@pytest.mark.parametrize('name', STABLEHLO_NAMES)
def test_stablehlo_artifact_reproduces_the_checkpoint_and_loads_with_jax_alone(name, detectors, tmp_path):
  detector = detectors(name)
  category = detector.categories[0]
  path = str(tmp_path / f'{name}.stablehlo')
  report = export.export(detector, category, 'stablehlo', path, count=4)
  assert report['passed'] and report['images'] == 4
  assert json.loads(open(path + '.parity.json').read()) == report
  images = export.parity_images(detector, category, 5)
  want = detector.predict(images.astype(np.float32) / 255.0, category=category)
  script = (
    'import sys, numpy as np, jax\n'
    'exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))\n'
    'x = np.load(sys.argv[2])\n'
    'for n in (2, 5):\n'  # The batch dimension is symbolic.
    '  out = exported.call(x[:n])\n'
    '  np.save(f"{sys.argv[2]}.{n}.npy", np.asarray(out["score"]))\n'
    'print(sorted(m for m in sys.modules if m.startswith("jaxad")))\n'
  )
  np.save(tmp_path / 'x.npy', images)
  done = subprocess.run(
    [sys.executable, '-c', script, path, str(tmp_path / 'x.npy')],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == '[]'  # Nothing of jaxad was imported.
  for n in (2, 5):
    np.testing.assert_allclose(np.load(tmp_path / f'x.npy.{n}.npy'), want.scores[:n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ONNX_NAMES)
def test_onnx_artifact_reproduces_the_checkpoint(name, detectors, tmp_path):
  pytest.importorskip('jax2onnx', reason='jax2onnx is not installed (see jaxad/export.py)')
  detector = detectors(name)
  report = export.export(detector, detector.categories[0], 'onnx', str(tmp_path / f'{name}.onnx'), count=4)
  assert report['passed'] and report['images'] == 4


def test_scanned_blocks_are_refused_for_onnx_with_the_flag_to_train_with(detectors, tmp_path):
  pytest.importorskip('jax2onnx', reason='jax2onnx is not installed (see jaxad/export.py)')
  detector = detectors('sivt')
  assert detector.config.sivt.scan_blocks
  with pytest.raises(RuntimeError, match=r'--config\.sivt\.scan_blocks=False'):
    export.export(detector, detector.categories[0], 'onnx', str(tmp_path / 'sivt.onnx'), count=4)
  assert not (tmp_path / 'sivt.onnx').exists()


def test_a_parity_failure_is_an_error(detectors, tmp_path):
  detector = detectors('mean_image')
  category = detector.categories[0]
  images = export.parity_images(detector, category, 2)
  reference = export.uint8_function(detector, category)
  # Ten times what the check allows the score (this detector's max_zscore divides by small deviations).
  shift = 10 * export.allowances(detector.calibrations[category], reference(images))['score']
  shifted = lambda x: [np.asarray(reference(x)[k]) + (shift if k == 'score' else 0.0) for k in export.OUTPUTS]
  with pytest.raises(export.ParityError, match='differs'):
    export.parity(detector, category, shifted, images, str(tmp_path / 'bad'), 'stablehlo')
  assert json.loads((tmp_path / 'bad.parity.json').read_text())['passed'] is False


def _calibration(**fields) -> calibration.Calibration:
  """A calibration of category 'c' from the training images with the given thresholds and statistics."""
  rules = {'rule': 'normal_quantile', 'pixel_rule': 'normal_quantile'}
  return calibration.Calibration(
    category='c', source='train', num_images=10, pixel_threshold=1.0, **rules, **fields
  )


@pytest.mark.parametrize('anomaly_map', ['model', 'deviation'])
def test_allowances_cover_a_map_difference_within_tolerance_after_the_zscore(anomaly_map):
  """A model map perturbed within TOLERANCE of its magnitude moves the max_zscore score, the normalised
  score and a `deviation` map by no more than `allowances` grants, while a plain 1e-4 would not hold."""
  rng = np.random.default_rng(0)
  mean, std = rng.uniform(0.0, 0.5, (8, 8)), rng.uniform(0.005, 0.2, (8, 8))
  calib = _calibration(
    image_score='max_zscore', image_threshold=6.0, normal_median=5.0, zscore_mean=mean, zscore_std=std
  )
  calib.anomaly_map = anomaly_map
  maps = rng.uniform(0.0, 0.9, (16, 8, 8))
  worst = np.where(std == std.min(), 1.0, 0.0) * export.TOLERANCE  # The whole allowance on the weakest pixel.
  outputs = lambda m: {
    'score': calibration.zscore_max(m, mean, std),
    'normalised_score': (calibration.zscore_max(m, mean, std) - calib.normal_median) / calib.normalising_span,
    'map': calib.anomaly_maps(m),
  }
  reference, moved = outputs(maps), outputs(maps + worst)
  allowed = export.allowances(calib, reference)
  for k in reference:
    diff = np.max(np.abs(moved[k] - reference[k]))
    assert diff <= allowed[k] * (1 + 1e-9), (k, diff, allowed[k])
  assert np.max(np.abs(moved['score'] - reference['score'])) > export.TOLERANCE * max(
    1.0, np.max(np.abs(reference['score']))
  )


def test_allowances_of_a_plain_score_are_the_relative_tolerance():
  calib = _calibration(image_score='model', image_threshold=4.0, normal_median=2.0)
  reference = {
    'score': np.array([0.5, 3.0]),
    'normalised_score': np.array([-1.5, 1.0]),
    'map': np.full((2, 4, 4), 50.0),
  }
  allowed = export.allowances(calib, reference)
  assert allowed['score'] == pytest.approx(3e-4)
  assert allowed['map'] == pytest.approx(5e-3)
  assert allowed['normalised_score'] == pytest.approx(1.5e-4)  # The score's, over the span 2.
