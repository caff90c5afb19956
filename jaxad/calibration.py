"""Calibration of a trained detector: image-score normalisation and image and pixel thresholds.

Made at the end of training, per category, from calibration images: a seeded held-out fraction of
train/good when `calibration.holdout > 0` (those images are not trained on), else the training images
themselves, whose scores run low because the model has seen them (the record says which). Stored
beside the checkpoints in `<run dir>/calibration/<category>.json` (+ `.npz` for per-pixel statistics,
`.reference.npz` for the model's reference statistics, jaxad.models), restored with the train state
by `jaxad.load` and used by evaluation, prediction and export.

Threshold rules (`calibration.rule`, and `calibration.pixel_rule` for predicted masks):
  normal_quantile  the (1 - false_positive_rate) quantile of the calibration images' scores (pixel
                   values for the pixel threshold): works without a single defective image;
  f1_max           the threshold of maximal F1 on a labelled MVTec-layout folder
                   (`calibration.labelled_root`, its test split of the category);
  manual           `calibration.manual_threshold` / `manual_pixel_threshold`, in raw score units.
The normalised score is (raw - median of the calibration scores) / (threshold - that median): 0 is a
typical normal image, 1 the threshold; an image is anomalous when its raw score reaches the threshold.
"""

import dataclasses
import io
import json
import os

import ml_collections
import numpy as np

from jaxad import metrics, provenance, writers

VERSION = 1
RULES = ('normal_quantile', 'f1_max', 'manual')
ANOMALY_MAPS = ('model', 'deviation')


@dataclasses.dataclass
class Calibration:
  """One category's calibration (see the module docstring)."""

  category: str
  image_score: str  # config.image_score it was made for: 'model' or 'max_zscore'.
  rule: str
  pixel_rule: str
  source: str  # 'holdout' or 'train' (biased low: the model saw these images).
  num_images: int
  image_threshold: float
  pixel_threshold: float
  normal_median: float  # Median raw image score of the calibration images.
  zscore_mean: np.ndarray | None = None  # [H, W]: per-pixel statistics of the training maps.
  zscore_std: np.ndarray | None = None  # [H, W], floored.
  # The model's `reference` statistics, averaged over the category's training images (jaxad.models).
  reference: dict[str, np.ndarray] | None = None
  version: int = VERSION
  anomaly_map: str = 'model'  # config.anomaly_map it was made for: 'model' or 'deviation'.

  def image_scores(self, maps: np.ndarray, model_scores: np.ndarray) -> np.ndarray:
    """Raw image scores [N] under `image_score` from the model's maps [N, H, W] and own scores."""
    if self.image_score == 'max_zscore':
      return zscore_max(maps, self.zscore_mean, self.zscore_std)
    return np.asarray(model_scores, np.float64)

  def anomaly_maps(self, maps):
    """The pixel maps under `anomaly_map` from the model's maps [N, H, W] (numpy or jax)."""
    return pixel_maps(maps, self.anomaly_map, self.zscore_mean, self.zscore_std)

  @property
  def normalising_span(self) -> float:
    """threshold - normal median (1 if not positive): the normalised score is (raw - median) / span."""
    span = self.image_threshold - self.normal_median
    return span if span > 0 else 1.0


def zscore_stats(normal_maps: np.ndarray, std_floor: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel mean and standard deviation of `normal_maps` [M, H, W], the std floored at
  `std_floor` times its image mean (jaxad.evaluate.max_zscore)."""
  mean, std = normal_maps.mean(0), normal_maps.std(0)
  return mean, np.maximum(std, std_floor * std.mean())


def zscore_max(maps: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """max over pixels of (maps - mean) / std, per map."""
  return ((maps - mean) / std).reshape(len(maps), -1).max(1)


def uses_pixel_statistics(config: ml_collections.ConfigDict) -> bool:
  """Whether scoring needs the per-pixel statistics of the training maps (zscore_stats): for
  image_score='max_zscore' or anomaly_map='deviation'."""
  return config.image_score == 'max_zscore' or config.anomaly_map == 'deviation'


def pixel_maps(maps, anomaly_map: str, mean=None, std=None):
  """The pixel anomaly maps under config.anomaly_map from the model's maps [N, H, W] (numpy or jax):
  'model' leaves them, 'deviation' gives |maps - mean| / std per pixel (zscore_stats of the training
  maps)."""
  if anomaly_map == 'model':
    return maps
  if anomaly_map == 'deviation':
    return abs(maps - mean) / std
  raise ValueError(f'Unknown anomaly_map {anomaly_map!r}; expected one of {ANOMALY_MAPS}.')


def holdout_split(samples: list, fraction: float, seed: int) -> tuple[list, list]:
  """(training samples, held-out calibration samples): a seeded `fraction` of the normal samples."""
  if not fraction:
    return list(samples), []
  if not 0 < fraction < 1:
    raise ValueError(f'calibration.holdout must be in [0, 1), got {fraction}')
  rng = np.random.default_rng([seed, 0xCA1])
  order = rng.permutation(len(samples))
  count = max(1, int(round(fraction * len(samples))))
  if count >= len(samples):
    raise ValueError(f'calibration.holdout={fraction} leaves no training image of {len(samples)}')
  held = set(order[:count].tolist())
  return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def _quantile(values: np.ndarray, false_positive_rate: float) -> float:
  if not 0 < false_positive_rate < 1:
    raise ValueError(f'calibration false positive rate must be in (0, 1), got {false_positive_rate}')
  # The smallest value with at most `false_positive_rate` of the normal values at or above it.
  return float(np.quantile(np.asarray(values, np.float64), 1.0 - false_positive_rate, method='higher'))


def _f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
  if labels.min() == labels.max():
    raise ValueError('calibration f1_max needs both normal and defective images in labelled_root')
  return float(metrics.f1_max_threshold(np.asarray(scores, np.float64), np.asarray(labels)))


def choose(
  cfg: ml_collections.ConfigDict,
  category: str,
  image_score: str,
  calib_maps: np.ndarray,
  calib_raw: np.ndarray,
  source: str,
  zscore: tuple[np.ndarray, np.ndarray] | None,
  labelled: dict | None = None,
  reference: dict[str, np.ndarray] | None = None,
  anomaly_map: str = 'model',
) -> Calibration:
  """A category's Calibration from its calibration images' maps and raw scores.

  `calib_maps` and the labelled maps are the pixel maps under `anomaly_map` (Calibration.anomaly_maps).
  `labelled`: {'raw': [N], 'labels': [N], 'maps': [N, H, W], 'masks': [N, H, W]} of the labelled
  folder (rule f1_max). `reference`: the model's fitted reference statistics, kept as they are.
  """
  for name, rule in (('rule', cfg.rule), ('pixel_rule', cfg.pixel_rule)):
    if rule not in RULES:
      raise ValueError(f'Unknown calibration.{name} {rule!r}; expected one of {RULES}.')
  if 'f1_max' in (cfg.rule, cfg.pixel_rule) and labelled is None:
    raise ValueError(
      "calibration rule 'f1_max' needs calibration.labelled_root, a labelled MVTec-layout folder"
    )
  if cfg.rule == 'normal_quantile':
    image_threshold = _quantile(calib_raw, cfg.false_positive_rate)
  elif cfg.rule == 'f1_max':
    image_threshold = _f1_max_threshold(labelled['raw'], labelled['labels'])
  else:
    image_threshold = float(cfg.manual_threshold)
  if cfg.pixel_rule == 'normal_quantile':
    pixel_threshold = _quantile(calib_maps.ravel(), cfg.pixel_false_positive_rate)
  elif cfg.pixel_rule == 'f1_max':
    pixel_threshold = _f1_max_threshold(labelled['maps'].ravel(), labelled['masks'].ravel())
  else:
    pixel_threshold = float(cfg.manual_pixel_threshold)
  mean, std = zscore if zscore is not None else (None, None)
  return Calibration(
    category=category,
    image_score=image_score,
    rule=cfg.rule,
    pixel_rule=cfg.pixel_rule,
    source=source,
    num_images=int(len(calib_raw)),
    image_threshold=image_threshold,
    pixel_threshold=pixel_threshold,
    normal_median=float(np.median(calib_raw)),
    zscore_mean=mean,
    zscore_std=std,
    reference=reference,
    anomaly_map=anomaly_map,
  )


def _paths(run_dir: str, category: str) -> tuple[str, str, str]:
  base = os.path.join(run_dir, 'calibration', category)
  return base + '.json', base + '.npz', base + '.reference.npz'


def _write_npz(path: str, arrays: dict) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  writers.atomic_write_bytes(path, buf.getvalue())


def save(run_dir: str, calib: Calibration) -> None:
  """Writes `<run_dir>/calibration/<category>.json` (+ .npz with the z-score statistics, + .reference.npz
  with the model's reference statistics) atomically."""
  json_path, npz_path, reference_path = _paths(run_dir, calib.category)
  os.makedirs(os.path.dirname(json_path), exist_ok=True)
  arrays = ('zscore_mean', 'zscore_std', 'reference')
  record = {k: v for k, v in dataclasses.asdict(calib).items() if k not in arrays}
  if calib.zscore_mean is not None:
    _write_npz(npz_path, {'mean': calib.zscore_mean, 'std': calib.zscore_std})
    record['zscore_file'] = os.path.basename(npz_path)
  if calib.reference is not None:
    _write_npz(reference_path, calib.reference)
    record['reference_file'] = os.path.basename(reference_path)
  writers.atomic_write_json(json_path, record)


def load(run_dir: str, category: str) -> Calibration:
  """The Calibration `save` wrote; FileNotFoundError naming what is missing."""
  json_path, _, _ = _paths(run_dir, category)
  if not os.path.exists(json_path):
    raise FileNotFoundError(
      f'{json_path} is missing: this run has no calibration (trained before calibration existed, or '
      'training did not finish). Rerun its training command with the same --workdir to calibrate it.'
    )
  record = writers.read_json(json_path)
  if record.get('version') != VERSION:
    raise ValueError(f'{json_path}: calibration version {record.get("version")}, expected {VERSION}')
  zscore_file = record.pop('zscore_file', None)
  if zscore_file:
    with np.load(os.path.join(os.path.dirname(json_path), zscore_file)) as z:
      record['zscore_mean'], record['zscore_std'] = z['mean'], z['std']
  reference_file = record.pop('reference_file', None)
  if reference_file:
    with np.load(os.path.join(os.path.dirname(json_path), reference_file)) as r:
      record['reference'] = {k: r[k] for k in r.files}
  return Calibration(**record)


def describe(calib: Calibration) -> dict:
  """The JSON-safe summary that metrics.json carries."""
  return {
    'rule': calib.rule,
    'pixel_rule': calib.pixel_rule,
    'source': calib.source,
    'num_images': calib.num_images,
    'image_threshold': calib.image_threshold,
    'pixel_threshold': calib.pixel_threshold,
  }


def load_config_record(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, from `<workdir>/config.json` (lists become tuples; fields
  added since it was recorded take the value that reproduces it, `provenance.implied_fields`)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: {workdir} is not a trained jaxad run directory.')
  flat = json.loads(open(path).read())['config']
  flat = {**provenance.implied_fields(flat['model.name']), **flat}
  tree = {}
  for key, value in flat.items():
    node = tree
    *parents, last = key.split('.')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = _tuples(value)
  return ml_collections.ConfigDict(tree)


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
