"""Shared fixtures: a small generated dataset and tiny configs for fast harness tests."""

import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Real anomaly datasets (MVTec AD bottle, Magnetic Tile), never part of the repository: $JAXAD_REALAD, by
# default the folder shared/data/realad beside the checkout. Tests that need them skip without them.
REALAD = pathlib.Path(os.environ.get('JAXAD_REALAD', REPO.parent / 'shared' / 'data' / 'realad'))


def pytest_configure(config):
  """One persistent compilation cache for the whole session, before the first compilation.

  Many tests build the same tiny configs in new `train()` calls or `jaxad.main` subprocesses (which
  inherit the variable), and each call is a new jit. With the cache they load the executables the
  first one compiled instead of compiling them again. A JAX_COMPILATION_CACHE_DIR you set yourself is
  used (and kept); otherwise a temporary folder is.
  """
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    path = tempfile.mkdtemp(prefix='jaxad-test-xla-')
    config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  import jax

  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory) -> str:
  """Two synthetic categories at 64x64 in MVTec layout (12 train, 4 good + 6 defect test images)."""
  from jaxad.data import synthetic

  root = tmp_path_factory.mktemp('tiny_synthetic')
  return synthetic.generate(
    str(root),
    seed=0,
    image_size=64,
    num_train=12,
    num_test_good=4,
    num_test_defect=6,
    categories=synthetic.CATEGORIES[:2],
  )


def tiny_folder_config(config, root: str):
  """A model config on a small folder dataset at 64x64 with batch 8."""
  config.dataset.name = 'folder'
  config.dataset.root = root
  config.dataset.image_size = 64
  config.batch_size = 8
  config.eval_batch_size = 8
  return config


def tiny_sivt_config(root: str, **overrides):
  """configs/sivt.py shrunk to seconds: 64x64 images, a 1+1-block ViT."""
  from configs import sivt

  c = tiny_folder_config(sivt.get_config(), root)
  c.num_epochs = 2
  c.log_every = 2
  c.checkpoint_every = 100
  c.num_heatmaps = 2
  c.sivt.feature_size = 8
  c.sivt.width = 32
  c.sivt.num_heads = 4
  c.sivt.encoder_depth = 1
  c.sivt.decoder_depth = 1
  c.sivt.smoothing_sigma = 2.0
  # The harness tests time and compare the cached-feature path; tests/test_sivt.py trains the default's
  # quarter turns.
  c.augment.rot90 = False
  return override(c, **overrides)


def override(config, **overrides):
  """Sets dotted config fields, e.g. override(c, **{'dataset.unified': False})."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return config


@pytest.fixture(scope='session')
def embedded_dataset(tmp_path_factory) -> str:
  """The default embedded dataset exactly as `dataset.name='synthetic'` generates it."""
  from jaxad.data import synthetic

  return synthetic.ensure(str(tmp_path_factory.mktemp('embedded')))
