"""How hard is a dataset? A training-free reference detector, per category and defect type.

    python benchmarks/dataset_difficulty.py                       # the embedded dataset, 128x128
    python benchmarks/dataset_difficulty.py --root $JAXAD_REALAD/mvtec_ad --image_size 256
    python benchmarks/dataset_difficulty.py --root $JAXAD_REALAD/mtd_full --features pixels \
        --channels 1 --image_size 128 --bank_size 200000

The reference is a nearest-neighbour patch memory (PatchCore without coreset subsampling). With
`--features sivt` (the default) its patches are SIVT's default features (`configs/sivt.py`'s own
`precompute`: EfficientNet-Lite0 stages 0-3, resized to image_size / 8 and concatenated). With
`--features pixels` they are the raw pixels of `--patch_size` squares at half that stride: close to
the error of a pixel reconstruction that reproduces every normal patch it has seen and nothing else. The
anomaly map is each test patch's L2 distance to its nearest training patch of the same category; the
image score is the maximum of the sigma-1 smoothed map; for pixel metrics the map is resized to the
image (bilinear) and smoothed with sigma 4 pixels, as the models' defaults do. It needs no training, so
it separates "the defects are not visible in these features" from "the model did not learn". The
embedded dataset was calibrated with it (jaxad/data/synthetic.py, version 2).
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
from tqdm import tqdm  # noqa: E402

from configs import sivt as sivt_config  # noqa: E402
from jaxad import metrics, train  # noqa: E402
from jaxad.data import folder, synthetic  # noqa: E402
from jaxad.models import layers  # noqa: E402

_MAP_SIGMA = 4.0  # Pixel-level smoothing at the input size, as the models' defaults.


def sivt_patches(size: int):
  """[N, H, W, C] images -> [N, size / 8, size / 8, D] SIVT default features."""
  config = sivt_config.get_config()
  config.dataset.image_size = size
  config.sivt.feature_size = size // 8
  sivt = train.build_model(config, total_steps=1)
  return jax.jit(lambda images: sivt.precompute({'image': images}, sivt.frozen)['features'])


def pixel_patches(patch_size: int):
  """[N, H, W, C] images -> [N, h, w, patch_size**2 * C] raw pixel squares at stride patch_size / 2."""
  stride = max(patch_size // 2, 1)

  @jax.jit
  def extract(images):
    return jax.lax.conv_general_dilated_patches(
      images, (patch_size, patch_size), (stride, stride), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  return extract


@jax.jit
def nearest_distance(queries, bank):
  d2 = jnp.sum(queries**2, 1)[:, None] + jnp.sum(bank**2, 1)[None] - 2 * queries @ bank.T
  return jnp.sqrt(jnp.maximum(jnp.min(d2, 1), 0))


def load(samples, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Images [N, S, S, C] in [0, 1] and boolean masks [N, S, S] of `samples`."""
  pairs = [folder.load_pair(s.image_path, s.mask_path, size, channels) for s in samples]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]) > 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='', help='MVTec-layout folder (default: the embedded dataset)')
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--features', choices=('sivt', 'pixels'), default='sivt')
  parser.add_argument('--patch_size', type=int, default=8, help='pixel squares (--features pixels)')
  parser.add_argument('--channels', type=int, default=3, choices=(1, 3), help='1: grey (--features pixels)')
  parser.add_argument(
    '--bank_size', type=int, default=0, help='seeded random subset of the training patches (0: all)'
  )
  args = parser.parse_args()
  root = args.root or synthetic.ensure()
  size = args.image_size
  if args.features == 'sivt':
    extract, channels = sivt_patches(size), 3
  else:
    extract, channels = pixel_patches(args.patch_size), args.channels

  def patches(images):
    out = np.concatenate([extract(images[i : i + 32]) for i in range(0, len(images), 32)])
    return out.shape[1:3], out.reshape(-1, out.shape[-1])

  results = {}
  for category in folder.list_categories(root):
    start = time.time()
    _, bank = patches(load(folder.scan_split(root, category, 'train'), size, channels)[0])
    if 0 < args.bank_size < len(bank):
      bank = bank[np.random.default_rng(0).choice(len(bank), args.bank_size, replace=False)]
    bank = jnp.asarray(bank)
    test = folder.scan_split(root, category, 'test')
    images, masks = load(test, size, channels)
    hw, queries = patches(images)
    dist = np.concatenate(
      [
        nearest_distance(jnp.asarray(queries[i : i + 4096]), bank)
        for i in tqdm(range(0, len(queries), 4096), desc=f'{category}: nearest patches', leave=False)
      ]
    )
    maps = dist.reshape(len(test), *hw)
    scores = np.array([ndimage.gaussian_filter(m, 1).max() for m in maps])
    pixel_maps = np.asarray(layers.gaussian_blur(layers.resize_maps(jnp.asarray(maps), size), _MAP_SIGMA))
    labels = np.array([s.label for s in test], bool)
    types = np.array([s.defect_type for s in test])
    results[category] = (metrics.image_auroc(scores, labels), metrics.pixel_auroc(pixel_maps, masks))
    per_type = {}
    for t in sorted(set(types) - {'good'}):
      sel = (types == t) | ~labels
      per_type[str(t)] = (
        round(100 * metrics.image_auroc(scores[sel], labels[sel]), 1),
        round(100 * metrics.pixel_auroc(pixel_maps[sel], masks[sel]), 1),
      )
    image, pixel = results[category]
    print(
      f'{category}: image AUROC {100 * image:.1f}  pixel AUROC {100 * pixel:.1f}  '
      f'per type (image, pixel) {per_type}  (bank {len(bank)} patches, {time.time() - start:.0f} s)',
      flush=True,
    )
  image, pixel = np.mean(list(results.values()), axis=0)
  print(f'mean: image AUROC {100 * image:.1f}  pixel AUROC {100 * pixel:.1f}')


if __name__ == '__main__':
  main()
