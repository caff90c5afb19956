"""The training-free nearest-neighbour reference of benchmarks/dataset_difficulty.py."""

import importlib.util

import numpy as np
import scipy.spatial.distance
from conftest import REPO


def _benchmark():
  spec = importlib.util.spec_from_file_location(
    'dataset_difficulty', REPO / 'benchmarks' / 'dataset_difficulty.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_pixel_patches_are_the_squares_at_half_stride():
  images = np.random.default_rng(0).random((2, 12, 12, 1), np.float32)
  patches = np.asarray(_benchmark().pixel_patches(4)(images))
  windows = np.lib.stride_tricks.sliding_window_view(images[..., 0], (4, 4), axis=(1, 2))[:, ::2, ::2]
  assert patches.shape == (2, 5, 5, 16)
  np.testing.assert_array_equal(patches, windows.reshape(2, 5, 5, 16))


def test_nearest_distance_matches_scipy():
  rng = np.random.default_rng(1)
  queries, bank = rng.random((50, 12), np.float32), rng.random((80, 12), np.float32)
  expected = scipy.spatial.distance.cdist(queries, bank).min(axis=1)
  np.testing.assert_allclose(np.asarray(_benchmark().nearest_distance(queries, bank)), expected, rtol=1e-4)
