"""Time ``jaxad.metrics.compute_all`` on a full-MVTec-AD-sized test set.

1725 maps at 256x256 (113 M pixels), float32 maps, about half of the images
anomalous with a few elliptical defects each (roughly MVTec's share of
anomalous pixels), maps = smoothed noise plus a noisy response on the defects.

    python benchmarks/metrics_speed.py [--n 1725] [--size 256] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxad import metrics  # noqa: E402


def make_data(n: int, size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  labels = rng.random(n) < 0.6
  masks = np.zeros((n, size, size), dtype=bool)
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  for i in np.flatnonzero(labels):
    for _ in range(rng.integers(1, 4)):
      cy, cx = rng.uniform(0, size, 2)
      ry, rx = rng.uniform(0.03, 0.15, 2) * size
      t = rng.uniform(0, np.pi)
      dy, dx = yy - cy, xx - cx
      u = (dy * np.cos(t) + dx * np.sin(t)) / ry
      v = (-dy * np.sin(t) + dx * np.cos(t)) / rx
      masks[i] |= u * u + v * v <= 1.0
  # Low-frequency noise (upsampled 16x16 grid) + defect response + pixel noise.
  coarse = rng.standard_normal((n, 16, 16)).astype(np.float32)
  maps = ndimage.zoom(coarse, (1, size / 16, size / 16), order=1)
  maps += 1.5 * masks * rng.uniform(0.3, 1.5, (n, 1, 1)).astype(np.float32)
  maps += 0.3 * rng.standard_normal(maps.shape, dtype=np.float32)
  scores = maps.reshape(n, -1).max(axis=1)
  return scores, labels, maps, masks


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--n', type=int, default=1725)
  p.add_argument('--size', type=int, default=256)
  p.add_argument('--repeat', type=int, default=1)
  a = p.parse_args()
  t0 = time.perf_counter()
  scores, labels, maps, masks = make_data(a.n, a.size)
  print(
    f'data: {maps.shape} {maps.dtype}, {maps.size / 1e6:.1f} M pixels, '
    f'{masks.mean():.2%} anomalous pixels, {labels.sum()} anomalous images '
    f'({time.perf_counter() - t0:.1f} s to generate)'
  )
  for _ in range(a.repeat):
    t0 = time.perf_counter()
    res = metrics.compute_all(scores, labels, maps, masks)
    dt = time.perf_counter() - t0
    print(f'compute_all: {dt:.2f} s  ' + '  '.join(f'{k}={v:.4f}' for k, v in res.items()))


if __name__ == '__main__':
  main()
