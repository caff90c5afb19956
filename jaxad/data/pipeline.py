"""grain input pipelines: seeded, worker-count-invariant training batches and ordered test batches."""

import dataclasses
import hashlib
import math

import grain
import ml_collections
import numpy as np
from scipy import ndimage

from jaxad.data import defects, folder, synthetic


def dataset_root(config: ml_collections.ConfigDict) -> str:
  """The MVTec-layout root the config names; the synthetic dataset is generated on first use."""
  ds = config.dataset
  if ds.name == 'synthetic':
    return synthetic.ensure(ds.root or None, seed=ds.synthetic_seed, image_size=ds.synthetic_size)
  if ds.name == 'folder':
    if not ds.root:
      raise ValueError("dataset.name='folder' needs dataset.root (an MVTec-AD-layout folder).")
    return ds.root
  if ds.name == 'tfds':
    return ds.root  # The MVTec-layout folder prepared on first use ('' once prepared).
  raise ValueError(f"Unknown dataset.name {ds.name!r}; expected 'synthetic', 'folder' or 'tfds'.")


def _prepared(config):
  """dataset.name='tfds': the TFDS builder of the prepared ArrayRecord files (built if missing)."""
  from jaxad.data import tfds_mvtec  # Imports tensorflow-datasets only when asked for.

  return tfds_mvtec.prepare(config.dataset, config.dataset.tfds_dir or None)


def categories(config, root: str) -> list[str]:
  """The categories `config.dataset.categories` selects ('all' or names), checked."""
  if config.dataset.name == 'tfds':
    from jaxad.data import tfds_mvtec

    available = tfds_mvtec.categories(_prepared(config))
    return folder.resolve_categories(root, config.dataset.categories, available=available)
  return folder.resolve_categories(root, config.dataset.categories)


def scan(config, root: str, category: str, split: str) -> list[folder.Sample]:
  if config.dataset.name == 'tfds':
    from jaxad.data import tfds_mvtec

    return tfds_mvtec.samples(_prepared(config), category, split)
  return folder.scan_split(
    root, category, split, good_name=config.dataset.good_name, mask_suffix=config.dataset.mask_suffix
  )


def image_source(config, samples: list[folder.Sample]):
  """The grain source of `samples`: decoded from files, or read from prepared TFDS records."""
  if config.dataset.name == 'tfds':
    from jaxad.data import tfds_mvtec

    return tfds_mvtec.TfdsSource(_prepared(config), samples)
  return ImageSource(samples, config.dataset.image_size, config.dataset.channels)


def _fingerprint(samples) -> str:
  return hashlib.sha1('\n'.join(s.image_path for s in samples).encode()).hexdigest()[:12]


class ImageSource:
  """grain data source: decoded, resized images (+ label, mask, index) of a list of samples."""

  def __init__(self, samples: list[folder.Sample], image_size: int, channels: int):
    self.samples = list(samples)
    self.image_size = image_size
    self.channels = channels

  def __len__(self):
    return len(self.samples)

  def __getitem__(self, index):
    s = self.samples[index]
    image, mask = folder.load_pair(s.image_path, s.mask_path, self.image_size, self.channels)
    return {
      'image': image,
      'label': np.int32(s.label),
      'mask': mask,
      'index': np.int32(index),
    }

  def __repr__(self):  # Stable: grain checks it when restoring an iterator state.
    return (
      f'ImageSource(n={len(self)}, size={self.image_size}, channels={self.channels}, '
      f'files={_fingerprint(self.samples)})'
    )


class ArraySource:
  """grain data source over in-memory per-example arrays (e.g. cached frozen-backbone features).

  With `quarter_turns`, every array holds each example under its four quarter turns, [N, 4, ...]
  (`QuarterTurned` 0-3), and training picks one per draw (`PickQuarterTurn`).
  """

  def __init__(self, arrays: dict[str, np.ndarray], name: str, quarter_turns: bool = False):
    self.arrays = arrays
    self.name = name
    self.quarter_turns = quarter_turns

  def __len__(self):
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, index):
    return {k: v[index] for k, v in self.arrays.items()}

  def __repr__(self):
    turns = ', quarter_turns' if self.quarter_turns else ''
    return f'ArraySource({self.name}, n={len(self)}, keys={sorted(self.arrays)}{turns})'


class QuarterTurned:
  """grain data source: `source` with every image and mask turned by `turns` quarter turns (np.rot90)."""

  def __init__(self, source, turns: int):
    self.source = source
    self.turns = turns

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    example = self.source[index]
    turned = {k: np.ascontiguousarray(np.rot90(example[k], self.turns)) for k in ('image', 'mask')}
    return {**example, **turned}

  def __repr__(self):
    return f'QuarterTurned({self.source!r}, turns={self.turns})'


@dataclasses.dataclass(frozen=True)
class Augment:
  """Config-driven augmentation of one example; randomness from grain's per-example generator."""

  hflip: bool
  vflip: bool
  rotate: float
  rot90: bool

  def __call__(self, example, rng: np.random.Generator):
    image, mask = example['image'], example['mask']
    if self.hflip and rng.random() < 0.5:
      image, mask = image[:, ::-1], mask[:, ::-1]
    if self.vflip and rng.random() < 0.5:
      image, mask = image[::-1], mask[::-1]
    if self.rot90:
      turns = int(rng.integers(4))
      image, mask = np.rot90(image, turns), np.rot90(mask, turns)
    if self.rotate:
      angle = rng.uniform(-self.rotate, self.rotate)
      image = ndimage.rotate(image, angle, axes=(1, 0), reshape=False, order=1, mode='reflect')
      mask = ndimage.rotate(mask, angle, axes=(1, 0), reshape=False, order=0, mode='constant')
    return {**example, 'image': np.ascontiguousarray(image, np.float32), 'mask': np.ascontiguousarray(mask)}


@dataclasses.dataclass(frozen=True)
class PickQuarterTurn:
  """`Augment` with quarter turns alone, on an `ArraySource` that holds the four turns: the same draw
  from grain's per-example generator picks the same turn, so cached and uncached runs train alike."""

  def __call__(self, example, rng: np.random.Generator):
    turns = int(rng.integers(4))
    return {k: v[turns] for k, v in example.items()}


def holds_quarter_turns(source) -> bool:
  """Whether `source` caches every example under its four quarter turns."""
  return isinstance(source, ArraySource) and source.quarter_turns


def augmentation(config) -> Augment | None:
  a = config.augment
  if not (a.hflip or a.vflip or a.rotate or a.rot90):
    return None
  return Augment(a.hflip, a.vflip, float(a.rotate), a.rot90)


def cacheable_turns(config) -> int | None:
  """How many quarter turns of each training image a cache of precomputed outputs must hold for
  `config.augment`: 1 without augmentation, 4 with quarter turns alone, None when it cannot be cached
  (flips or free rotation)."""
  a = config.augment
  if a.hflip or a.vflip or a.rotate:
    return None
  return 4 if a.rot90 else 1


def total_steps(num_examples: int, config) -> int:
  steps = math.floor(num_examples * config.num_epochs / config.batch_size)
  if steps < 1:
    raise ValueError(
      f'{num_examples} training examples x {config.num_epochs} epochs give no full '
      f'batch of {config.batch_size}.'
    )
  return steps


def train_batches(source, config, seed: int, *, process_index: int, process_count: int) -> grain.MapDataset:
  """This process's slice of every global batch, reshuffled each epoch from `seed`, as a MapDataset.

  The order depends only on (seed, dataset, batch size, process count): not on the worker count.
  """
  local_batch = config.batch_size // process_count
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(config.num_epochs)
  augment = PickQuarterTurn() if holds_quarter_turns(source) else augmentation(config)
  if augment is not None:
    ds = ds.random_map(augment, seed=seed)
  synthesize = defects.synthesizer(config, source)
  if synthesize is not None:  # Artificial defects (RB-AE Eq. 1), after the augmentation.
    ds = ds.random_map(synthesize, seed=int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
  return ds[process_index::process_count].batch(local_batch, drop_remainder=True)


class StackedBatches:
  """grain data source: batch i of every replica's `train_batches`, stacked on a new leading axis."""

  def __init__(self, datasets: list):
    self.datasets = datasets

  def __len__(self):
    return len(self.datasets[0])

  def __getitem__(self, index):
    batches = [d[index] for d in self.datasets]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

  def __repr__(self):
    return f'StackedBatches(replicas={len(self.datasets)}, {self.datasets[0]!r})'


def train_iterator(source, config, *, process_index: int, process_count: int):
  """The training batches of `train_batches` from config.seed, as a (checkpointable) grain iterator.

  With `config.num_seeds` = K > 1, batches [K, B, ...]: replica k's is exactly the batch the single
  run with seed config.seed + k gets. `source` is then one source the replicas share, or a list of
  K (one per replica).
  """
  k = config.num_seeds
  sources = list(source) if isinstance(source, (list, tuple)) else [source] * k
  datasets = [
    train_batches(s, config, config.seed + i, process_index=process_index, process_count=process_count)
    for i, s in enumerate(sources)
  ]
  if len({len(d) for d in datasets}) != 1:
    raise ValueError(f'The {k} replicas have training sets of different sizes: {[len(s) for s in sources]}.')
  ds = datasets[0] if k == 1 else grain.MapDataset.source(StackedBatches(datasets))
  it = ds.to_iter_dataset()
  if config.dataset.num_workers > 0:
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=config.dataset.num_workers, per_worker_buffer_size=config.dataset.prefetch
      )
    )
  return iter(it)


def ordered_batches(source, batch_size: int, num_workers: int = 0, prefetch: int = 2):
  """Batches of `source` in order; the last one is padded by repeating its final example.

  Yields (batch, num_valid).
  """
  ds = grain.MapDataset.source(source).batch(batch_size, drop_remainder=False).to_iter_dataset()
  if num_workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
    )
  for batch in ds:
    n = len(next(iter(batch.values())))
    if n < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in batch.items()}
    yield batch, n
