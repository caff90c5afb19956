"""SIVT learns: it beats chance and the mean-image baseline on the embedded data, and real MVTec bottle."""

import jax
import numpy as np
import pytest

from conftest import REALAD
from configs import mean_image as mean_image_config
from configs import sivt as sivt_config
from jaxad import models, parallel, train
from jaxad.data import folder, pipeline


def _folder(config, root, **overrides):
  config.dataset.name = 'folder'
  config.dataset.root = root
  config.num_heatmaps = 0
  for k, v in overrides.items():
    config[k] = v
  return config


def test_paper_variant_asks_for_backbone_weights():
  config = sivt_config.get_config('paper')
  with pytest.raises(FileNotFoundError, match='jaxad.port --arch efficientnet_b4'):
    models.build(config, total_steps=1)


def test_paper_variant_one_step_smoke(tiny_dataset, tmp_path):
  """The paper architecture (b4 features 32x32x272, 12+8 blocks of width 240) trains one step."""
  config = sivt_config.get_config('paper')
  config.backbone.weights = 'random'  # No b4 ImageNet weights exist offline.
  config = _folder(config, tiny_dataset, eval_batch_size=8)
  root = config.dataset.root
  samples = [s for c in folder.list_categories(root) for s in pipeline.scan(config, root, c, 'train')]
  model, state, _ = train.train(config, str(tmp_path), samples, parallel.make_mesh(), stop_after=1)
  assert int(state.step) == 1
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  assert 13e6 < n_params < 16e6, n_params  # The paper reports 14.59 M.


def _mean_metrics(config, workdir) -> dict:
  results = train.train_and_evaluate(config, str(workdir))
  return {k: np.mean([m[k] for m in results.values()])
          for k in ('image_auroc', 'pixel_auroc', 'aupro')}


def test_sivt_beats_mean_image_on_embedded_data_at_pixel_and_image_level(embedded_dataset,
                                                                         tmp_path):
  sivt = _mean_metrics(_folder(sivt_config.get_config(), embedded_dataset, num_epochs=10),
                       tmp_path / 'sivt')
  baseline = _mean_metrics(_folder(mean_image_config.get_config(), embedded_dataset),
                           tmp_path / 'baseline')
  print('SIVT', sivt, '\nmean image', baseline)
  # Pixel level over ~2.5 M test pixels of five categories: chance is 0.5 (+- 0.001), the baseline
  # measured 0.44 and SIVT 0.89 after these 10 epochs (0.93 after the default 30), so 0.8 and a 0.25
  # lead leave a wide margin. AUPRO (chance ~0.15 at FPR 0.3): baseline 0.22, SIVT 0.70.
  assert sivt['pixel_auroc'] >= 0.8
  assert sivt['pixel_auroc'] >= baseline['pixel_auroc'] + 0.25
  assert sivt['aupro'] >= baseline['aupro'] + 0.15
  # Image level (150 test images; the sd of the five-category mean AUROC of random scores is ~0.04):
  # measured SIVT 0.66 after 10 epochs (0.76 after 30), the baseline 0.47.
  assert sivt['image_auroc'] >= 0.6
  assert sivt['image_auroc'] >= baseline['image_auroc'] + 0.1


@pytest.mark.slow
def test_sivt_default_config_on_real_mvtec_bottle(tmp_path):
  root = REALAD / 'mvtec_ad'
  if not (root / 'bottle').is_dir():
    pytest.skip(f'real MVTec AD bottle not found at {root}')
  config = _folder(sivt_config.get_config(), str(root), num_epochs=15)
  results = train.train_and_evaluate(config, str(tmp_path))
  print(results)
  assert results['bottle']['image_auroc'] >= 0.9  # The papers report 94-100 on bottle.
