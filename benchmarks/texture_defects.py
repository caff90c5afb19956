"""Real photographed textures with synthetic defects, in the MVTec layout, to test localisation on textures.

    python benchmarks/texture_defects.py --out /data/texture_defects [--size 192] [--seed 0]
    python -m jaxad.main --config configs/mask_vitgan.py --workdir runs/mvg_textures \
        --config.dataset.name=folder --config.dataset.root=/data/texture_defects

Three categories from the grayscale texture photographs that ship inside scikit-image (`brick`, `grass`,
`gravel`, 512x512): 80 training and 20 good test crops of `--size` pixels each, and 10 defective test
crops of each of four kinds inside a Perlin mask (jaxad.data.defects.perlin_mask, 2-10 % of the crop):
  smooth   the crop blurred (Gaussian, sigma 6 px): the texture is removed, the local mean kept;
  foreign  a crop of another of the three textures;
  shift    the intensity moved by +-0.2;
  scratch  a straight line, 4 px wide, in black or white.
A reconstruction model that cannot reproduce a stochastic texture errs most on the texture itself, so
its error is lowest where `smooth` and some `foreign` defects remove texture (docs/models/mask_vitgan.md).
Needs scikit-image (the test extras).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from jaxad.data import defects  # noqa: E402

TEXTURES = ('brick', 'grass', 'gravel')
KINDS = ('smooth', 'foreign', 'shift', 'scratch')
NUM_TRAIN, NUM_TEST_GOOD, NUM_PER_KIND = 80, 20, 10

_OUT = flags.DEFINE_string('out', None, 'Folder to write (MVTec layout).', required=True)
_SIZE = flags.DEFINE_integer('size', 192, 'Crop size in pixels (at most 512).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the crops and defects.')


def crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  y, x = rng.integers(0, texture.shape[0] - size + 1, 2)
  return texture[y : y + size, x : x + size].copy()


def scratch_mask(size: int, rng: np.random.Generator) -> np.ndarray:
  """A straight line 4 px wide between two random points at least size/4 apart."""
  while True:
    (y0, x0), (y1, x1) = rng.uniform(0.1 * size, 0.9 * size, (2, 2))
    if np.hypot(y1 - y0, x1 - x0) >= size / 4:
      break
  yy, xx = np.mgrid[:size, :size]
  dy, dx = y1 - y0, x1 - x0
  t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx), 0, 1)
  return np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx)) <= 2.0


def defective(image: np.ndarray, kind: str, other: np.ndarray, rng: np.random.Generator):
  """(defective image, mask) of one `kind` on `image` [S, S] in [0, 1]; `other` is another texture."""
  size = image.shape[0]
  if kind == 'scratch':
    mask = scratch_mask(size, rng)
    return np.where(mask, rng.choice([0.05, 0.95]), image), mask
  mask = defects.perlin_mask(size, rng, coverage=(0.02, 0.10), scales=(1, 3)) > 0
  if kind == 'smooth':
    fill = ndimage.gaussian_filter(image, 6.0)
  elif kind == 'foreign':
    fill = crop(other, size, rng)
  else:
    fill = np.clip(image + rng.choice([-0.2, 0.2]), 0, 1)
  return np.where(mask, fill, image), mask


def write(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def main(argv):
  del argv
  import skimage.data

  size, out = _SIZE.value, _OUT.value
  textures = {n: getattr(skimage.data, n)().astype(np.float32) / 255 for n in TEXTURES}
  for index, name in enumerate(TEXTURES):
    rng = np.random.default_rng([_SEED.value, index])
    others = [textures[o] for o in TEXTURES if o != name]
    for i in range(NUM_TRAIN):
      write(f'{out}/{name}/train/good/{i:03d}.png', crop(textures[name], size, rng))
    for i in range(NUM_TEST_GOOD):
      write(f'{out}/{name}/test/good/{i:03d}.png', crop(textures[name], size, rng))
    for kind in KINDS:
      for i in range(NUM_PER_KIND):
        image, mask = defective(crop(textures[name], size, rng), kind, others[i % 2], rng)
        write(f'{out}/{name}/test/{kind}/{i:03d}.png', image)
        write(f'{out}/{name}/ground_truth/{kind}/{i:03d}_mask.png', mask.astype(np.float32))
  print(f'Wrote {out}: {", ".join(TEXTURES)}')


if __name__ == '__main__':
  app.run(main)
