"""Mean-image baseline (docs/models/mean_image.md): one pass over the training set."""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  common.parse_arg(arg, 'mean_image')
  c = common.get_config()
  c.model.name = 'mean_image'
  c.num_epochs = 1
  c.dataset.unified = False  # One mean image per category (a unified one would average all categories).
  c.mean_image = ml_collections.ConfigDict()
  c.mean_image.smoothing_sigma = 4.0  # Gaussian sigma (pixels) applied to the distance map.
  return c
