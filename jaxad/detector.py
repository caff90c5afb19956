"""A trained, calibrated detector loaded from a workdir: `detector = jaxad.load(workdir)`.

`detector.predict(images_or_paths)` scores images with the model, the stored image-score normalisation
and the calibrated thresholds (jaxad.calibration). `detector.function(category)` is the same detector
as one pure JAX function, which jaxad.predict jits and jaxad.export serialises: both give the same
numbers by construction.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxad import calibration, models, train, writers
from jaxad.data import folder


@dataclasses.dataclass
class Prediction:
  """Per image: raw and normalised score, verdict, anomaly map and predicted mask (model resolution)."""

  scores: np.ndarray  # [N] raw image scores (config.image_score).
  normalised_scores: np.ndarray  # [N] 1 at the threshold (jaxad.calibration).
  verdicts: np.ndarray  # [N] bool, True = anomalous.
  maps: np.ndarray  # [N, S, S] float32 anomaly maps.
  masks: np.ndarray  # [N, S, S] bool predicted defect masks.
  categories: list[str]  # The category each image was scored as.


@dataclasses.dataclass
class _Run:
  model: models.AnomalyModel
  state: Any
  frozen: Any


class Detector:
  """The trained model(s) and calibrations of one workdir."""

  def __init__(self, config: ml_collections.ConfigDict, runs: dict, calibrations: dict, workdir: str):
    self.config, self.workdir = config, workdir
    self._runs = runs  # category -> _Run (one shared _Run for a unified model)
    self.calibrations = calibrations  # category -> calibration.Calibration
    self._jitted = {}

  @property
  def categories(self) -> list[str]:
    return sorted(self.calibrations)

  @property
  def image_size(self) -> int:
    return self.config.dataset.image_size

  @property
  def channels(self) -> int:
    return self.config.dataset.channels

  def function(self, category: str | None = None) -> Callable[[jax.Array], dict]:
    """The whole detector of `category` as a pure function of images [B, S, S, C] float32 in [0, 1].

    Returns {'score', 'normalised_score', 'anomalous', 'map', 'mask'}; the weights, the model's
    reference statistics, normalisation statistics and thresholds are constants of the function.
    """
    category = self._category(category)
    run, calib = self._runs[category], self.calibrations[category]
    state = run.state if run.model.reference is None else models.with_reference(run.state, calib.reference)
    span = calib.normalising_span
    zscore = None
    if calib.zscore_mean is not None:
      zscore = (jnp.asarray(calib.zscore_mean, jnp.float32), jnp.asarray(calib.zscore_std, jnp.float32))

    def detect(images: jax.Array) -> dict:
      maps, model_scores = run.model.score(state, {'image': images}, run.frozen)
      maps = maps.astype(jnp.float32)
      if calib.image_score == 'max_zscore':
        raw = jnp.max(((maps - zscore[0]) / zscore[1]).reshape(maps.shape[0], -1), axis=1)
      else:
        raw = model_scores.astype(jnp.float32)
      maps = calibration.pixel_maps(maps, calib.anomaly_map, *(zscore or (None, None)))
      return {
        'score': raw,
        'normalised_score': (raw - calib.normal_median) / span,
        'anomalous': raw >= calib.image_threshold,
        'map': maps,
        'mask': maps >= calib.pixel_threshold,
      }

    return detect

  def _category(self, category: str | None) -> str:
    if category is None:
      if len(self.calibrations) != 1:
        raise ValueError(f'This detector has categories {self.categories}: name one (category=...).')
      return self.categories[0]
    if category not in self.calibrations:
      raise ValueError(f'Unknown category {category!r}; this detector has {self.categories}.')
    return category

  def load_images(self, paths: Sequence[str]) -> np.ndarray:
    """Images decoded and resized as in training: float32 [N, S, S, C] in [0, 1]."""
    return np.stack([folder.load_image(p, self.image_size, self.channels) for p in paths])

  def predict(
    self, images_or_paths, category: str | None = None, batch_size: int | None = None
  ) -> Prediction:
    """Scores images: file paths, or an array [N, S, S, C] float32 in [0, 1] (one image: [S, S, C])."""
    category = self._category(category)
    if isinstance(images_or_paths, (str, os.PathLike)):
      images_or_paths = [images_or_paths]
    if isinstance(images_or_paths, np.ndarray) or isinstance(images_or_paths, jax.Array):
      images = np.asarray(images_or_paths, np.float32)
      images = images[None] if images.ndim == 3 else images
    else:
      images = self.load_images([os.fspath(p) for p in images_or_paths])
    want = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or images.shape[1:] != want:
      raise ValueError(f'images must be [N, {want[0]}, {want[1]}, {want[2]}] in [0, 1], got {images.shape}')
    fn = self._jitted.get(category) or self._jitted.setdefault(category, jax.jit(self.function(category)))
    batch = batch_size or self.config.eval_batch_size
    parts = []
    for start in range(0, len(images), batch):
      chunk = images[start : start + batch]
      pad = batch - len(chunk)  # One compiled batch shape; the padding rows are dropped.
      out = jax.device_get(fn(np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)))))
      parts.append({k: v[: len(chunk)] for k, v in out.items()})
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
    if cat is None:
      empty = np.zeros((0, self.image_size, self.image_size))
      return Prediction(np.zeros(0), np.zeros(0), np.zeros(0, bool), empty, empty.astype(bool), [])
    return Prediction(
      scores=cat['score'].astype(np.float64),
      normalised_scores=cat['normalised_score'].astype(np.float64),
      verdicts=cat['anomalous'].astype(bool),
      maps=cat['map'],
      masks=cat['mask'].astype(bool),
      categories=[category] * len(images),
    )


def _restore(config: ml_collections.ConfigDict, run_dir: str) -> _Run:
  """The model and its latest intact train state in `run_dir`, for inference (no data iterator)."""
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, 'checkpoints')))
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f'{run_dir}/checkpoints holds no checkpoint: train this run first.')
  model = train.build_model(config, 1)  # The step count sizes only the LR schedule.
  size, channels = config.dataset.image_size, config.dataset.channels
  example = {'image': np.zeros((1, size, size, channels), np.float32)}
  if model.prepare is not None:
    example.update(model.prepare([{'image': example['image'][0]}]))
  init = lambda: train.RunState(
    jnp.zeros((), jnp.int32), model.init(jax.random.key(0), example, model.frozen)
  )
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.eval_shape(init))
  try:
    _, restored, _ = train.restore_newest_intact(
      mngr, lambda: ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
  finally:
    mngr.close()
  return _Run(model, restored.state.model, model.frozen)


def load(workdir: str) -> Detector:
  """The detector a finished `python -m jaxad.main` run left in `workdir` (model, state, calibration)."""
  config = calibration.load_config_record(workdir)
  metrics = os.path.join(workdir, 'metrics.json')
  if not os.path.exists(metrics):
    raise FileNotFoundError(
      f'{metrics} is missing: the run in {workdir} has not finished; rerun its command.'
    )
  categories = sorted(writers.read_metrics(metrics)['categories'])
  runs, calibrations = {}, {}
  if config.dataset.unified:
    shared = _restore(config, workdir)
    for c in categories:
      runs[c], calibrations[c] = shared, calibration.load(workdir, c)
  else:
    for c in categories:
      run_dir = os.path.join(workdir, c)
      runs[c], calibrations[c] = _restore(config, run_dir), calibration.load(run_dir, c)
  return Detector(config, runs, calibrations, workdir)
