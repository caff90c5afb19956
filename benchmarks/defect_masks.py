"""What artificial defects does a config make? Mask statistics of `config.defects`, beside DRAEM's recipe.

    python benchmarks/defect_masks.py --config configs/rbae.py:paper [--num 400] [--size 64] \
        [--config.defects.mask=coverage ...]

Draws `--num` examples through the pipeline's own transform (jaxad/data/defects.py, seeded with
`config.seed`) on a constant image of `--size` pixels and prints the share without a defect (left clean
by `defects.clean_fraction`, or an empty mask); then, with clean_fraction 0, the share of empty masks
and the area (mean, standard deviation, 10/50/90 % quantiles) of the others. Then the same for DRAEM's
masks (Zavrtanik et al. 2021, github.com/VitjanZ/DRAEM: perlin.py's rand_perlin_2d_np, lattice
2^a x 2^b with a, b in 0..5 as torch.randint(0, 6), rotated by U(-90, 90) degrees with bilinear
interpolation and zero fill as imgaug's Affine(rotate=(-90, 90)) does, noise > 0.5) at that size: a
reference for `defects.mask='threshold'` (which rotates with reflection at the borders instead).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from scipy import ndimage  # noqa: E402

from benchmarks.draem_reference import draem_perlin  # noqa: E402
from jaxad.data import defects  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/rbae.py', 'The config.', lock_config=False)
_NUM = flags.DEFINE_integer('num', 400, 'Examples drawn.')
_SIZE = flags.DEFINE_integer('size', 64, 'Image size (a power of two, for DRAEM lattices up to 32).')


def summary(name: str, areas: np.ndarray) -> str:
  shown = areas[areas > 0]
  q10, q50, q90 = np.quantile(shown, (0.1, 0.5, 0.9))
  return (
    f'{name}: empty masks {np.mean(areas == 0):.3f}; area of the others mean {shown.mean():.4f} '
    f'std {shown.std():.4f}, quantiles 10/50/90 % {q10:.4f} / {q50:.4f} / {q90:.4f}'
  )


def mask_areas(config, n: int, size: int) -> np.ndarray:
  """Mask area fractions of `n` examples drawn through `config.defects` from `config.seed`."""
  synthesize = defects.synthesizer(config, None)
  rng = np.random.default_rng(config.seed)
  image = np.full((size, size, 3), 0.5, np.float32)
  return np.array([synthesize({'image': image}, rng)['defect_mask'].mean() for _ in range(n)])


def main(argv):
  del argv
  config, n, size = _CONFIG.value, _NUM.value, _SIZE.value
  config.defects.enabled = True
  config.defects.fill = 'procedural'  # The fill does not change the masks.
  d = config.defects
  print(
    f'config: mask={d.mask} threshold={d.threshold} coverage={tuple(d.coverage)} '
    f'perlin_scales={tuple(d.perlin_scales)} clean_fraction={d.clean_fraction}; {n} examples at {size}x{size}'
  )
  print(
    f'jaxad: examples without a defect (clean or empty mask) {np.mean(mask_areas(config, n, size) == 0):.3f}'
  )
  d.clean_fraction = 0.0
  print(summary('jaxad, clean_fraction 0', mask_areas(config, n, size)))
  rng = np.random.default_rng(config.seed)
  draem = []
  for _ in range(n):
    res = tuple(2 ** int(rng.integers(0, 6)) for _ in range(2))
    noise = draem_perlin((size, size), res, rng)
    noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1, mode='constant', cval=0.0)
    draem.append((noise > 0.5).mean())
  print(summary("DRAEM's masks", np.array(draem)))


if __name__ == '__main__':
  app.run(main)
