"""DRAEM-style artificial defects for training (RB-AE Eq. 1): I_ad = I_o * (1 - I_m) + I_n * I_m.

I_m is thresholded Perlin noise (DRAEM, Zavrtanik et al. 2021), I_n an image from the source the config
names; a fraction `clean_fraction` of the examples stays defect-free (I_m = 0), as DRAEM leaves half of
its samples. Applied per example inside the grain pipeline (`random_map`), so the defects depend only on
the seed and the example's position in the stream, and resume exactly with the iterator state.
"""

import dataclasses
import os

import ml_collections
import numpy as np
from scipy import ndimage

from jaxad.data import folder


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """2-D gradient (Perlin) noise on a res[0] x res[1] lattice with the quintic fade (DRAEM's rand_perlin_2d).

  Any shape works: the lattice is evaluated at pixel centres, no divisibility needed.
  """
  h, w = shape
  angles = rng.uniform(0, 2 * np.pi, (res[0] + 1, res[1] + 1))
  grads = np.stack([np.cos(angles), np.sin(angles)], -1)
  y = (np.arange(h) + 0.5) * res[0] / h
  x = (np.arange(w) + 0.5) * res[1] / w
  yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
  fy, fx = (y - yi)[:, None], (x - xi)[None, :]
  fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3

  def corner(dy, dx):
    g = grads[(yi + dy)[:, None], (xi + dx)[None, :]]
    return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

  uy, ux = fade(fy), fade(fx)
  top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
  bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
  return (np.sqrt(2) * (top * (1 - uy) + bottom * uy)).astype(np.float32)


def perlin_mask(
  size: int,
  rng: np.random.Generator,
  coverage: tuple[float, float],
  scales: tuple[int, int],
  threshold: float | None = None,
) -> np.ndarray:
  """Binary float32 [size, size] mask: Perlin noise (lattice 2^a x 2^b, a, b in [scales]), rotated by a
  random angle, then thresholded at `threshold` (DRAEM: 0.5, the area varies with the noise) or, when it
  is None, at the quantile that leaves a fraction U(coverage) of the pixels on."""
  res = tuple(2 ** int(rng.integers(scales[0], scales[1] + 1)) for _ in range(2))
  noise = perlin_noise((size, size), res, rng)
  noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1, mode='reflect')
  if threshold is None:
    threshold = np.quantile(noise, 1 - rng.uniform(*coverage))
  return (noise > threshold).astype(np.float32)


def procedural_texture(size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
  """A random texture in [0, 1]: per-channel multi-octave Perlin noise plus a random sinusoidal grating."""
  octaves = []
  for c in range(channels):
    n = sum(perlin_noise((size, size), (2**o, 2**o), rng) / 2 ** (o - 1) for o in range(1, 5))
    octaves.append(n)
  noise = np.stack(octaves, -1)
  yy, xx = np.mgrid[:size, :size] / size
  angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 24)
  grating = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
  img = noise + rng.uniform(0, 1) * grating + rng.uniform(-1, 1, channels)
  img = (img - img.min()) / (img.max() - img.min() + 1e-6)
  return img.astype(np.float32)


def _augment_photo(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """DRAEM-like photometric/geometric augmentation of a fill image: gamma, brightness, channel shuffle,
  inversion, rotation."""
  x = np.clip(image, 0, 1) ** rng.uniform(0.5, 2.0)
  x = np.clip(x * rng.uniform(0.6, 1.4) + rng.uniform(-0.3, 0.3), 0, 1)
  if x.shape[-1] > 1:
    x = x[..., rng.permutation(x.shape[-1])]
  if rng.random() < 0.5:
    x = 1 - x
  x = ndimage.rotate(x, rng.uniform(-90, 90), axes=(1, 0), reshape=False, order=1, mode='reflect')
  return np.ascontiguousarray(x, np.float32)


@dataclasses.dataclass(frozen=True)
class DefectSynthesizer:
  """grain random_map transform adding 'defect_image' (Eq. 1) and 'defect_mask' (I_m, float32 [H, W]).

  fill: 'train' (augmented other training images), 'procedural' (random textures), or 'folder'
  (augmented images from `fill_paths`). threshold: the fixed mask threshold, or None for `coverage`.
  """

  fill: str
  coverage: tuple[float, float]
  scales: tuple[int, int]
  source: object = None  # the training source (fill='train')
  fill_paths: tuple[str, ...] = ()  # image files (fill='folder')
  threshold: float | None = None
  clean_fraction: float = 0.0  # probability that an example is left defect-free
  # The fill's weight inside the mask ~ U(lo, hi) (DRAEM's 1 - beta); (1, 1) is Eq. 1's replacement.
  opacity: tuple[float, float] = (1.0, 1.0)

  def fill_image(self, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    if self.fill == 'procedural':
      return procedural_texture(size, channels, rng)
    if self.fill == 'train':
      image = self.source[int(rng.integers(len(self.source)))]['image']
    else:
      image = folder.load_image(self.fill_paths[int(rng.integers(len(self.fill_paths)))], size, channels)
    return _augment_photo(image, rng)

  def __call__(self, example, rng: np.random.Generator):
    image = example['image']
    size, channels = image.shape[0], image.shape[-1]
    if rng.random() < self.clean_fraction:
      return {**example, 'defect_image': image, 'defect_mask': np.zeros((size, size), np.float32)}
    mask = perlin_mask(size, rng, self.coverage, self.scales, self.threshold)
    fill = self.fill_image(size, channels, rng)
    m = mask[..., None]
    if self.opacity != (1.0, 1.0):  # Drawn only when it varies: runs without it keep their defects.
      m = m * rng.uniform(*self.opacity)
    return {**example, 'defect_image': (image * (1 - m) + fill * m).astype(np.float32), 'defect_mask': mask}


def fill_paths(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The fill images of defects.fill='folder' (sorted), () for the other fills; a missing or empty
  folder and unknown settings are an error (jaxad.train checks this before it reads any data)."""
  d = config.defects
  if d.fill not in ('train', 'procedural', 'folder'):
    raise ValueError(f"Unknown defects.fill {d.fill!r}; expected 'train', 'procedural' or 'folder'.")
  if d.mask not in ('coverage', 'threshold'):
    raise ValueError(f"Unknown defects.mask {d.mask!r}; expected 'coverage' or 'threshold'.")
  lo, hi = d.coverage
  if not 0 < lo <= hi < 1:
    raise ValueError(f'defects.coverage {tuple(d.coverage)} must satisfy 0 < lo <= hi < 1.')
  if not 0 <= d.clean_fraction < 1:
    raise ValueError(f'defects.clean_fraction {d.clean_fraction} must be in [0, 1).')
  if d.fill != 'folder':
    return ()
  if not d.fill_root or not os.path.isdir(d.fill_root):
    raise FileNotFoundError(
      f"defects.fill='folder' needs defects.fill_root, a folder of fill images (e.g. DTD or ImageNet); "
      f'{d.fill_root!r} is not a folder.'
    )
  paths = tuple(
    sorted(
      os.path.join(r, f)
      for r, _, fs in os.walk(d.fill_root)
      for f in fs
      if f.lower().endswith(folder.IMAGE_EXTENSIONS)
    )
  )
  if not paths:
    raise FileNotFoundError(
      f'defects.fill_root {d.fill_root!r} holds no images ({", ".join(folder.IMAGE_EXTENSIONS)}).'
    )
  return paths


def synthesizer(config: ml_collections.ConfigDict, source) -> DefectSynthesizer | None:
  """The transform `config.defects` describes, or None when it is not enabled."""
  d = config.defects
  if not d.enabled:
    return None
  paths = fill_paths(config)
  return DefectSynthesizer(
    d.fill,
    tuple(float(c) for c in d.coverage),
    tuple(int(s) for s in d.perlin_scales),
    source,
    paths,
    float(d.threshold) if d.mask == 'threshold' else None,
    float(d.clean_fraction),
    tuple(float(o) for o in d.opacity),
  )
