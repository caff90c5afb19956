"""DRAEM's Perlin noise as its own code draws it: the reference that jaxad's artificial-defect masks are
checked against (benchmarks/defect_masks.py, tests/test_rbae.py).

Zavrtanik et al., "DRAEM", ICCV 2021, github.com/VitjanZ/DRAEM, perlin.py: rand_perlin_2d_np.
"""

import math

import numpy as np


def draem_perlin(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """DRAEM's rand_perlin_2d_np, its np.random draws taken from `rng`."""
  lerp = lambda x, y, w: (y - x) * w + x
  fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3
  delta = (res[0] / shape[0], res[1] / shape[1])
  d = (shape[0] // res[0], shape[1] // res[1])
  grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
  angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
  gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
  tile = lambda s1, s2: np.repeat(np.repeat(gradients[s1[0] : s1[1], s2[0] : s2[1]], d[0], 0), d[1], 1)
  dot = lambda g, shift: (np.stack((grid[..., 0] + shift[0], grid[..., 1] + shift[1]), -1) * g).sum(-1)
  n00, n10 = dot(tile([0, -1], [0, -1]), [0, 0]), dot(tile([1, None], [0, -1]), [-1, 0])
  n01, n11 = dot(tile([0, -1], [1, None]), [0, -1]), dot(tile([1, None], [1, None]), [-1, -1])
  t = fade(grid)
  return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])
