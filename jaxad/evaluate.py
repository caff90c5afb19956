"""Scores test splits and writes metrics.json, results.md and heatmap PNGs."""

import copy
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from jaxad import calibration, metrics, models, parallel, provenance, writers
from jaxad.data import pipeline

METRIC_NAMES = ('image_auroc', 'image_ap', 'pixel_auroc', 'pixel_ap', 'aupro', 'f1_max')
IMAGE_SCORES = ('model', 'max_zscore')
# What `python -m jaxad.evaluate` may change of a trained run's config: which test data it reads and
# how many heatmaps it draws. The model, its scoring and its calibration are the run's own.
EVALUATE_OVERRIDES = (
  'dataset.name',
  'dataset.root',
  'dataset.categories',
  'dataset.tfds_dir',
  'dataset.good_name',
  'dataset.mask_suffix',
  'dataset.num_workers',
  'dataset.prefetch',
  'num_heatmaps',
)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any training on evaluation settings that evaluation would reject."""
  if config.image_score not in IMAGE_SCORES:
    raise ValueError(f'Unknown image_score {config.image_score!r}; expected one of {IMAGE_SCORES}.')
  if config.anomaly_map not in calibration.ANOMALY_MAPS:
    raise ValueError(
      f'Unknown anomaly_map {config.anomaly_map!r}; expected one of {calibration.ANOMALY_MAPS}.'
    )


def check_overrides(recorded: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
  """Refuses overrides of a trained run's config other than `EVALUATE_OVERRIDES`, which a loaded
  detector would otherwise ignore without a word."""
  refused = provenance.differences(
    {'config': provenance.flat_config(recorded), 'data': None},
    {'config': provenance.flat_config(config), 'data': None},
    EVALUATE_OVERRIDES,
  )
  if refused:
    lines = '\n'.join(f'  {k}: {old!r} -> {new!r}' for k, (old, new) in refused.items())
    raise ValueError(
      "jaxad.evaluate scores with the trained run's own model, scoring and calibration; it can only "
      f'change {", ".join(EVALUATE_OVERRIDES)}. Refused:\n{lines}\nTo rescore the run with other '
      'scoring fields, rerun its `python -m jaxad.main` command with the new values (evaluation '
      "only; it rewrites the run's metrics, so copy the workdir first to keep them)."
    )


def max_zscore(maps: np.ndarray, normal_maps: np.ndarray, std_floor: float = 0.1) -> np.ndarray:
  """Image scores [N]: the maximum over pixels of `maps` [N, H, W] standardised per pixel.

  Each pixel's map value is centred on its mean over `normal_maps` [M, H, W] (the training images'
  maps) and divided by their standard deviation, floored at `std_floor` times its mean over the image
  so that pixels that hardly vary in training cannot dominate. On roughly aligned images, regions a
  model always reconstructs badly then stop deciding the image score.
  """
  mean, std = calibration.zscore_stats(normal_maps, std_floor)
  return calibration.zscore_max(maps, mean, std)


def score_samples(config, model, state, frozen, samples, mesh, score_fn=None) -> dict:
  """Anomaly maps [N, H, W], image scores [N], labels [N] and masks [N, H, W] of `samples`."""
  score_fn = score_fn or jax.jit(model.score, out_shardings=parallel.replicated(mesh))
  source = pipeline.image_source(config, samples)
  out = {'maps': [], 'scores': [], 'labels': [], 'masks': []}
  for (maps, scores), batch, n in parallel.map_in_order(
    lambda b: score_fn(state, b, frozen), source, config, mesh
  ):
    out['maps'].append(np.asarray(maps, np.float32)[:n])
    out['scores'].append(np.asarray(scores, np.float32)[:n])
    out['labels'].append(batch['label'][:n])
    out['masks'].append(batch['mask'][:n])
  return {k: np.concatenate(v) for k, v in out.items()}


def fit_reference(config, model, state, frozen, samples, mesh) -> dict[str, np.ndarray]:
  """The model's `reference` statistics averaged over `samples` (a category's training images)."""
  fn = jax.jit(model.reference, out_shardings=parallel.replicated(mesh))
  sums, count = None, 0
  for out, _, n in parallel.map_in_order(
    lambda b: fn(state, b, frozen), pipeline.image_source(config, samples), config, mesh
  ):
    part = {k: np.asarray(v, np.float64)[:n].sum(0) for k, v in out.items()}
    sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
    count += n
  if not count:
    raise ValueError(f'{config.model.name} needs training images to fit its reference statistics.')
  return {k: (v / count).astype(np.float32) for k, v in sums.items()}


def category_state(config, model, state, frozen, category, mesh, train_by_category=None, calibrations=None):
  """The state `model.score` sees for `category`: with the model's reference statistics (from the
  category's calibration, else fitted on `train_by_category[category]`) where the model has them."""
  if model.reference is None:
    return state
  if calibrations is not None:
    reference = calibrations[category].reference
  elif train_by_category is not None:
    reference = fit_reference(config, model, state, frozen, train_by_category[category], mesh)
  else:
    raise ValueError(
      f'{config.model.name} scores against reference statistics: it needs the training samples.'
    )
  return models.with_reference(state, reference)


def evaluate(
  config: ml_collections.ConfigDict,
  model,
  state,
  frozen,
  test_by_category: dict,
  mesh,
  outdir: str,
  train_by_category: dict | None = None,
  calibrations: dict | None = None,
) -> dict:
  """Per-category metrics of a trained model; heatmaps go to <outdir>/heatmaps/<category>/.

  With `config.image_score == 'max_zscore'` the image scores, and with `config.anomaly_map ==
  'deviation'` the pixel maps, come from the per-pixel statistics of the category's training maps: those
  stored in `calibrations[category]` (jaxad.calibration), else computed from
  `train_by_category[category]`. A model with `reference` statistics is scored against the category's
  (category_state).
  """
  check_config(config)
  needs_stats = calibration.uses_pixel_statistics(config)
  if needs_stats and train_by_category is None and calibrations is None:
    raise ValueError(
      f'image_score={config.image_score!r} with anomaly_map={config.anomaly_map!r} needs the training '
      'samples or the calibration.'
    )
  score_fn = jax.jit(model.score, out_shardings=parallel.replicated(mesh))
  results = {}
  for category, samples in test_by_category.items():
    scoring_state = category_state(
      config, model, state, frozen, category, mesh, train_by_category, calibrations
    )
    scored = score_samples(config, model, scoring_state, frozen, samples, mesh, score_fn)
    if needs_stats and calibrations is not None:
      scored['scores'] = calibrations[category].image_scores(scored['maps'], scored['scores'])
      scored['maps'] = calibrations[category].anomaly_maps(scored['maps'])
    elif needs_stats:
      normal = score_samples(
        config, model, scoring_state, frozen, train_by_category[category], mesh, score_fn
      )
      stats = calibration.zscore_stats(normal['maps'])
      if config.image_score == 'max_zscore':
        scored['scores'] = calibration.zscore_max(scored['maps'], *stats)
      scored['maps'] = calibration.pixel_maps(scored['maps'], config.anomaly_map, *stats)
    results[category] = metrics.compute_all(
      scored['scores'], scored['labels'], scored['maps'], scored['masks']
    )
    if jax.process_index() == 0 and config.num_heatmaps:
      write_heatmaps(os.path.join(outdir, 'heatmaps', category), samples, scored, config)
  return results


def mean_metrics(per_category: dict) -> dict:
  names = sorted({k for m in per_category.values() for k in m})
  return {k: float(np.nanmean([m.get(k, np.nan) for m in per_category.values()])) for k in names}


def write_results(
  workdir: str,
  per_category: dict,
  config: ml_collections.ConfigDict,
  provenance: dict | None = None,
  calibration_summary: dict | None = None,
) -> dict:
  """Writes metrics.json and results.md (per category and mean) atomically; returns the mean.

  Undefined metrics (NaN/Inf, e.g. pixel metrics of a test split without defects) are null in
  metrics.json, 'n/a' in results.md, and logged as a warning. `provenance`, if given, is stored in
  metrics.json under 'provenance'.
  """
  mean = mean_metrics(per_category)
  if jax.process_index() != 0:
    return mean
  for name, m in [*((f'category {c}', m) for c, m in per_category.items()), ('mean over categories', mean)]:
    if undefined := undefined_metrics(m):
      logging.warning(
        '%s: %s undefined (NaN/Inf), written as null in metrics.json', name, ', '.join(undefined)
      )
  os.makedirs(workdir, exist_ok=True)
  writers.atomic_write_json(
    os.path.join(workdir, 'metrics.json'),
    {
      'model': config.model.name,
      'categories': per_category,
      'mean': mean,
      **({} if provenance is None else {'provenance': provenance}),
      **({} if calibration_summary is None else {'calibration': calibration_summary}),
    },
  )
  rows = [
    f'| {c} | ' + ' | '.join(_pct(m.get(k)) for k in METRIC_NAMES) + ' |'
    for c, m in [*per_category.items(), ('**mean**', mean)]
  ]
  header = '| category | ' + ' | '.join(METRIC_NAMES) + ' |'
  table = '\n'.join([header, '|' + '---|' * (len(METRIC_NAMES) + 1), *rows])
  writers.atomic_write_text(
    os.path.join(workdir, 'results.md'),
    f'# {config.model.name} on {config.dataset.name} ({config.dataset.root or "default"})\n\n'
    f'{table}\n\nAll numbers in percent.\n',
  )
  return mean


def undefined_metrics(values: dict) -> list[str]:
  """Names of the metrics in `values` that are NaN or Inf."""
  return [k for k, v in values.items() if isinstance(v, (float, np.floating)) and not np.isfinite(v)]


def _pct(value) -> str:
  return 'n/a' if value is None or not np.isfinite(value) else f'{100 * value:.1f}'


def heatmap_panel(
  image: np.ndarray, mask: np.ndarray, amap: np.ndarray, vmin: float, vmax: float
) -> np.ndarray:
  """uint8 [H, 3W, 3]: input | ground truth (red) | jet heatmap overlaid on the input."""
  import matplotlib

  rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
  gt = rgb * 0.5
  gt[mask > 0] = (1.0, 0.1, 0.1)
  norm = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1)
  heat = matplotlib.colormaps['jet'](norm)[..., :3]
  overlay = 0.5 * rgb + 0.5 * heat
  return (np.concatenate([rgb, gt, overlay], axis=1) * 255).round().astype(np.uint8)


def write_heatmaps(outdir: str, samples, scored: dict, config):
  """PNGs for an evenly spread sample of test images (all defect types), one colour scale per category."""
  os.makedirs(outdir, exist_ok=True)
  maps = scored['maps']
  vmin, vmax = float(np.min(maps)), float(np.percentile(maps, 99.9))
  count = min(config.num_heatmaps, len(samples))
  source = pipeline.image_source(config, samples)
  for i in np.linspace(0, len(samples) - 1, count).round().astype(int):
    s = samples[i]
    panel = heatmap_panel(source[i]['image'], scored['masks'][i], maps[i], vmin, vmax)
    stem = os.path.splitext(os.path.basename(s.image_path))[0]
    Image.fromarray(panel).save(os.path.join(outdir, f'{s.defect_type}_{stem}.png'))


def evaluate_detector(detector, config: ml_collections.ConfigDict, output: str) -> dict:
  """Scores the test split `config.dataset` names with a loaded detector; writes to `output` only.

  The trained run (checkpoints, calibration, its metrics.json) is read, never written. Besides the
  usual metrics, each category gets `accuracy_at_threshold`: the share of test images whose verdict at
  the calibrated threshold matches their label.
  """
  root = pipeline.dataset_root(config)
  categories = pipeline.categories(config, root)
  results = {}
  for category in categories:
    trained = category if category in detector.categories else None
    if trained is None and len(detector.categories) == 1:
      trained = detector.categories[0]  # A new category layout for a one-category detector.
    if trained is None:
      raise ValueError(
        f'Test category {category!r} is not one this detector was trained on ({detector.categories}).'
      )
    samples = pipeline.scan(config, root, category, 'test')
    source = pipeline.image_source(config, samples)
    images = np.stack([source[i]['image'] for i in range(len(source))])
    labels = np.array([s.label for s in samples])
    masks = np.stack([source[i]['mask'] for i in range(len(source))])
    pred = detector.predict(images, category=trained)
    results[category] = metrics.compute_all(pred.scores, labels, pred.maps, masks)
    results[category]['accuracy_at_threshold'] = float(np.mean(pred.verdicts == (labels == 1)))
    if config.num_heatmaps:
      scored = {'maps': pred.maps, 'masks': masks}
      write_heatmaps(os.path.join(output, 'heatmaps', category), samples, scored, config)
  write_results(output, results, config)
  return results


def _cli():
  """python -m jaxad.evaluate --workdir W [--output O] [--config.dataset.root=... --config.x=y]."""
  import sys

  from absl import app, flags
  from ml_collections import config_flags

  from jaxad import detector as detector_lib

  workdir = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir=')), None)
  if workdir is None and '--workdir' in sys.argv[:-1]:
    workdir = sys.argv[sys.argv.index('--workdir') + 1]
  if workdir is None:
    sys.exit('usage: python -m jaxad.evaluate --workdir W [--output O] [--config.dataset.root=...]')
  flags.DEFINE_string('workdir', None, 'A finished run of python -m jaxad.main.')
  flags.DEFINE_string('output', None, 'Where to write (default <workdir>/evaluations/<dataset root name>).')
  recorded = calibration.load_config_record(workdir)
  config_flag = config_flags.DEFINE_config_dict(
    'config', copy.deepcopy(recorded), 'The run config; override the data.'
  )

  def main(argv):
    del argv
    config = config_flag.value
    try:
      check_overrides(recorded, config)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    name = os.path.basename(os.path.normpath(config.dataset.root)) or config.dataset.name
    output = flags.FLAGS.output or os.path.join(workdir, 'evaluations', name)
    if os.path.abspath(output) == os.path.abspath(workdir):
      raise app.UsageError('--output must not be the training workdir (its metrics.json would be replaced).')
    detector = detector_lib.load(workdir)
    mean = mean_metrics(evaluate_detector(detector, config, output))
    logging.info('Wrote %s: %s', output, {k: round(v, 4) for k, v in mean.items()})

  app.run(main)


if __name__ == '__main__':
  _cli()
