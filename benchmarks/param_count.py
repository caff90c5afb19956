"""Parameter counts of a model's trainable parts, from shapes only (jax.eval_shape: nothing is run).

  python benchmarks/param_count.py --config configs/mask_vitgan.py:paper

Prints one JSON object: per TrainState of the model state (e.g. Mask-ViT-GAN's `g` and `d`) its total
and the count of each top-level parameter group (`generator`, `encoder`, ...).
"""

import json
import os
import sys

import jax
import numpy as np
from absl import app
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxad import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Model config file.', lock_config=False)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def main(argv):
  del argv
  config = _CONFIG.value
  model = train.build_model(config, 1)
  size, channels = config.dataset.image_size, config.dataset.channels
  example = {'image': np.zeros((1, size, size, channels), np.float32)}
  state = jax.eval_shape(model.init, jax.random.key(0), example, model.frozen)
  out = {}
  for name, params in train.params_of(state).items():
    groups = {k: count(v) for k, v in params.items()} if isinstance(params, dict) else {}
    out[name] = {'total': count(params), **groups}
  print(json.dumps({'model': config.model.name, 'image_size': size, 'parameters': out}))


if __name__ == '__main__':
  app.run(main)
