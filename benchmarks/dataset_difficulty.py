"""How hard is a dataset at image level? A training-free reference detector, per category.

    python benchmarks/dataset_difficulty.py                       # the embedded dataset, 128x128
    python benchmarks/dataset_difficulty.py --root $JAXAD_REALAD/mvtec_ad --image_size 256

The reference is a nearest-neighbour patch memory (PatchCore without coreset subsampling) on SIVT's
default features (`configs/sivt.py`'s own `precompute`: EfficientNet-Lite0 stages 0-3, resized to
image_size / 8 and concatenated). The
anomaly map is each test patch's L2 distance to its nearest training patch of the same category, the
image score the maximum of the sigma-1 smoothed map. It needs no training, so it separates "the
defects are not visible in ImageNet features" from "the model did not learn". The embedded dataset
was calibrated with it (jaxad/data/synthetic.py, version 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from configs import sivt as sivt_config  # noqa: E402
from jaxad import metrics, train  # noqa: E402
from jaxad.data import folder, synthetic  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='', help='MVTec-layout folder (default: the embedded dataset)')
  parser.add_argument('--image_size', type=int, default=128)
  args = parser.parse_args()
  root = args.root or synthetic.ensure()
  size, feature_size = args.image_size, args.image_size // 8
  config = sivt_config.get_config()
  config.dataset.image_size = size
  config.sivt.feature_size = feature_size
  sivt = train.build_model(config, total_steps=1)
  features = jax.jit(lambda images: sivt.precompute({'image': images}, sivt.frozen)['features'])

  def patches(samples):
    images = np.stack([folder.load_image(s.image_path, size) for s in samples])
    out = np.concatenate([features(images[i : i + 32]) for i in range(0, len(images), 32)])
    return jnp.asarray(out.reshape(-1, out.shape[-1]))

  @jax.jit
  def nearest_distance(queries, bank):
    d2 = jnp.sum(queries**2, 1)[:, None] + jnp.sum(bank**2, 1)[None] - 2 * queries @ bank.T
    return jnp.sqrt(jnp.maximum(jnp.min(d2, 1), 0))

  results = {}
  for category in folder.list_categories(root):
    start = time.time()
    bank = patches(folder.scan_split(root, category, 'train'))
    test = folder.scan_split(root, category, 'test')
    queries = patches(test)
    dist = np.concatenate(
      [nearest_distance(queries[i : i + 4096], bank) for i in range(0, len(queries), 4096)]
    )
    maps = dist.reshape(len(test), feature_size, feature_size)
    scores = np.array([ndimage.gaussian_filter(m, 1).max() for m in maps])
    labels = np.array([s.label for s in test], bool)
    types = np.array([s.defect_type for s in test])
    per_type = {
      str(t): round(metrics.image_auroc(scores[(types == t) | ~labels], labels[(types == t) | ~labels]), 3)
      for t in sorted(set(types) - {'good'})
    }
    results[category] = metrics.image_auroc(scores, labels)
    print(
      f'{category}: image AUROC {results[category]:.3f}  {per_type}  ({time.time() - start:.0f} s)',
      flush=True,
    )
  print(f'mean: image AUROC {np.mean(list(results.values())):.3f}')


if __name__ == '__main__':
  main()
