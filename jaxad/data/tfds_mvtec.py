"""Prepared data: MVTec-layout folders as a tensorflow-datasets ArrayRecord dataset (no TensorFlow).

The builder reads `<manual_dir>/<category>/{train,test,ground_truth}` exactly as `folder.scan_split` does,
decodes and resizes every image and mask once with `folder.load_image` / `folder.load_mask`, and stores
them as PNG bytes at the configured size (8-bit: lossless for 8-bit sources, so the pixels a run sees
are the folder path's pixels). One TFDS split per `<category>_<train|test>`, in scan order; the sample
list (paths, defect types, labels) lives in the dataset's metadata, so training needs only the prepared
files. Read back with `tfds.data_source` as a grain source (`TfdsSource`).
"""

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxad.data import folder

NAME = 'jaxad_mvtec_layout'


@dataclasses.dataclass
class LayoutConfig(tfds.core.BuilderConfig):
  image_size: int = 128
  channels: int = 3
  good_name: str = 'good'
  mask_suffix: str = '_mask'


def builder_config(dataset_config) -> LayoutConfig:
  """The builder config a jaxad `config.dataset` block asks for (name = dataset, size, channels)."""
  ds = dataset_config
  tag = ds.tfds_name or os.path.basename(os.path.normpath(ds.root))
  if not tag:
    raise ValueError("dataset.name='tfds' needs dataset.tfds_name or dataset.root (the MVTec folder).")
  return LayoutConfig(
    name=f'{tag}_{ds.image_size}px_{ds.channels}ch',
    version='1.0.0',
    image_size=ds.image_size,
    channels=ds.channels,
    good_name=ds.good_name,
    mask_suffix=ds.mask_suffix,
  )


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buf, 'PNG')
  return buf.getvalue()


class MVTecLayout(tfds.core.GeneratorBasedBuilder):
  """Any MVTec-AD-layout dataset (manual_dir = its root), resized to the config's image size."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'manual_dir: the MVTec-layout root (<root>/<category>/train/...).'

  def _info(self) -> tfds.core.DatasetInfo:
    s, c = self.builder_config.image_size, self.builder_config.channels
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'MVTec-layout anomaly detection data at {s}x{s}x{c}.',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(s, s, c), encoding_format='png'),
          'mask': tfds.features.Image(shape=(s, s, 1), encoding_format='png'),
          'label': tfds.features.Scalar(np.int32),
          'index': tfds.features.Scalar(np.int32),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    cfg = self.builder_config
    samples, generators = {}, {}
    for category in folder.list_categories(root):
      for split in folder.SPLITS:
        found = folder.scan_split(root, category, split, good_name=cfg.good_name, mask_suffix=cfg.mask_suffix)
        samples[f'{category}_{split}'] = [
          [
            os.path.relpath(x.image_path, root),
            x.defect_type,
            x.label,
            os.path.relpath(x.mask_path, root) if x.mask_path else None,
          ]
          for x in found
        ]
        generators[f'{category}_{split}'] = self._generate_examples(found)
    self.info.metadata['samples'] = samples
    return generators

  def _generate_examples(self, samples):
    size, channels = self.builder_config.image_size, self.builder_config.channels
    for i, s in enumerate(samples):
      image, mask = folder.load_pair(s.image_path, s.mask_path, size, channels)
      image = np.round(image * 255).astype(np.uint8)
      yield (
        i,
        {
          'image': _png(image),
          'mask': _png(mask[..., None]),
          'label': np.int32(s.label),
          'index': np.int32(i),
        },
      )


def prepare(dataset_config, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds the ArrayRecord files from `dataset_config.root` unless they exist; returns the builder."""
  builder = MVTecLayout(config=builder_config(dataset_config), data_dir=data_dir or None)
  if not builder.is_prepared():
    if not dataset_config.root:
      raise ValueError(f'{builder.data_dir} is not prepared and dataset.root (manual_dir) is empty.')
    builder.download_and_prepare(
      file_format='array_record', download_config=tfds.download.DownloadConfig(manual_dir=dataset_config.root)
    )
  return builder


def samples(builder, category: str, split: str) -> list[folder.Sample]:
  """The `folder.Sample`s of one split, from the metadata (paths relative to the original root)."""
  return [
    folder.Sample(path, category, defect_type, label, mask)
    for path, defect_type, label, mask in builder.info.metadata['samples'][f'{category}_{split}']
  ]


def categories(builder) -> list[str]:
  return sorted({k.rsplit('_', 1)[0] for k in builder.info.metadata['samples']})


class TfdsSource:
  """grain source over prepared records: the same dict (float32 image, mask, label, index) as ImageSource."""

  def __init__(self, builder, samples_: list[folder.Sample]):
    self.config = builder.builder_config
    self.data_dir = os.fspath(builder.data_dir_root)
    self.samples = list(samples_)
    where = {}
    for split, rows in builder.info.metadata['samples'].items():
      for i, row in enumerate(rows):
        where[row[0]] = (split, i)
    missing = [s.image_path for s in self.samples if s.image_path not in where]
    if missing:
      raise folder.DatasetError(f'{self.data_dir}: prepared {NAME}/{self.config.name} lacks {missing[:3]}')
    self.where = [where[s.image_path] for s in self.samples]
    self._sources = {}

  def _source(self, split):
    if split not in self._sources:
      self._sources[split] = tfds.data_source(
        NAME, split=split, data_dir=self.data_dir, download=False, builder_kwargs={'config': self.config}
      )
    return self._sources[split]

  def __len__(self):
    return len(self.samples)

  def __getitem__(self, index):
    split, i = self.where[index]
    record = self._source(split)[i]
    if record['index'] != i:
      raise folder.DatasetError(f'{self.data_dir}: record {i} of {split} holds example {record["index"]}')
    return {
      'image': record['image'].astype(np.float32) * (1.0 / 255.0),
      'label': np.int32(record['label']),
      'mask': record['mask'][..., 0],
      'index': np.int32(index),
    }

  def __getstate__(self):  # grain workers reopen the files.
    return {**self.__dict__, '_sources': {}}

  def __repr__(self):  # Stable: grain checks it when restoring an iterator state.
    return f'TfdsSource({NAME}/{self.config.name}, n={len(self)}, first={self.samples[0].image_path})'
