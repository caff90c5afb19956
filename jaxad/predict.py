"""Scores new images with a trained, calibrated detector (docs/deploy.md).

  python -m jaxad.predict --workdir W --input DIR|FILE|GLOB [--output O] [--category C] [--masks]

Per image: raw score, normalised score (1 at the threshold), verdict, written to predictions.csv and
predictions.jsonl; an overlay PNG (input | heatmap with the predicted-mask contour, verdict and score);
with --masks a binary mask PNG at the input's size. A file that cannot be read is named, the others
are still scored, and the exit code is 2.
"""

import csv
import glob
import json
import os
import sys

import numpy as np
from absl import app, flags, logging
from PIL import Image
from tqdm.auto import tqdm

from jaxad import writers
from jaxad.data import folder

FIELDS = ('path', 'category', 'score', 'normalised_score', 'verdict', 'error')


def input_paths(spec: str) -> list[str]:
  """The image files a folder (recursively), a file or a glob names, sorted."""
  if os.path.isdir(spec):
    found = [
      os.path.join(r, f)
      for r, _, fs in os.walk(spec)
      for f in fs
      if not f.startswith('.') and f.lower().endswith(folder.IMAGE_EXTENSIONS)
    ]
  elif os.path.exists(spec):
    found = [spec]
  else:
    found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
  if not found:
    raise FileNotFoundError(f'No image files found at {spec!r}.')
  return sorted(found)


def category_of(path: str, categories: list[str], category: str | None) -> str:
  """The category to score `path` as: the given one, the only one, or one named in the path."""
  if category is not None or len(categories) == 1:
    return category or categories[0]
  named = [c for c in categories if c in os.path.normpath(path).split(os.sep)]
  if len(named) != 1:
    raise ValueError(f'{path}: cannot tell its category; pass --category (one of {categories}).')
  return named[0]


def _read(path: str, size: int, channels: int):
  """(image for the model, original image as uint8 RGB, (W, H)) of one file; DatasetError if unreadable."""
  image = folder.load_image(path, size, channels)
  w, h = folder._probe(path, 'image', decode=False)  # After EXIF orientation, as the model saw it.
  original = np.round(folder.load_image(path, (h, w), 3) * 255.0).astype(np.uint8)  # 16-bit too.
  return image, original


def predict_paths(
  detector, paths: list[str], category: str | None = None, batch_size: int | None = None, on_scored=None
) -> list[dict]:
  """Scores `paths` in batches; returns a row per path with FIELDS (unreadable files: an 'error', no score).

  `on_scored(row, original, map, mask)` is called for every scored image as its batch finishes, so
  that pictures are written as they come and none is kept.
  """
  if category is not None and category not in detector.categories:
    raise ValueError(f'Unknown category {category!r}; this detector has {detector.categories}.')
  batch = batch_size or detector.config.eval_batch_size
  rows, pending = [], []

  def flush():
    by_category = {}
    for item in pending:
      by_category.setdefault(item[1], []).append(item)
    for cat, items in by_category.items():
      pred = detector.predict(np.stack([i[2] for i in items]), category=cat)
      for k, (path, _, _, original) in enumerate(items):
        row = {
          'path': path,
          'category': cat,
          'score': float(pred.scores[k]),
          'normalised_score': float(pred.normalised_scores[k]),
          'verdict': 'anomalous' if pred.verdicts[k] else 'normal',
          'error': '',
        }
        rows.append(row)
        if on_scored is not None:
          on_scored(row, original, pred.maps[k], pred.masks[k])
    pending.clear()

  for path in tqdm(paths, desc='predict', unit='img'):
    try:
      cat = category_of(path, detector.categories, category)
      image, original = _read(path, detector.image_size, detector.channels)
    except (folder.DatasetError, OSError, ValueError) as e:
      logging.error('%s: %s', path, e)
      rows.append(
        {
          'path': path,
          'category': '',
          'score': None,
          'normalised_score': None,
          'verdict': '',
          'error': str(e),
        }
      )
      continue
    pending.append((path, cat, image, original))
    if len(pending) == batch:
      flush()
  flush()
  order = {p: i for i, p in enumerate(paths)}
  rows.sort(key=lambda r: order[r['path']])
  return rows


def _resized(a: np.ndarray, size_wh: tuple[int, int], resample) -> np.ndarray:
  return np.asarray(Image.fromarray(a).resize(size_wh, resample))


def overlay_png(original: np.ndarray, amap: np.ndarray, mask: np.ndarray, row: dict, vmax: float, path: str):
  """Input | heatmap overlay with the predicted-mask contour, the verdict and score in the title."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  h, w = original.shape[:2]
  big_map = _resized(amap.astype(np.float32), (w, h), Image.BILINEAR)
  big_mask = _resized(mask.astype(np.uint8) * 255, (w, h), Image.NEAREST) > 127
  fig, axes = plt.subplots(1, 2, figsize=(8, 4 * h / max(w, 1) + 0.6), dpi=100)
  axes[0].imshow(original)
  axes[0].set_title('input')
  axes[1].imshow(original)
  axes[1].imshow(big_map, cmap='jet', alpha=0.5, vmin=0.0, vmax=vmax)
  if big_mask.any():
    axes[1].contour(big_mask, levels=[0.5], colors='white', linewidths=1.0)
  colour = 'red' if row['verdict'] == 'anomalous' else 'green'
  title = f'{row["verdict"]}  score {row["normalised_score"]:.2f} (raw {row["score"]:.4g})'
  axes[1].set_title(title, color=colour)
  for ax in axes:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _unique_stem(path: str, used: set) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  parent = os.path.basename(os.path.dirname(path))
  name, k = stem, 1
  while name in used:  # Same stem in different folders: prefix the folder, then number.
    name = f'{parent}_{stem}' if k == 1 else f'{parent}_{stem}_{k}'
    k += 1
  used.add(name)
  return name


class PictureWriter:
  """An `on_scored` for predict_paths: writes overlays/ and (with `masks`) masks/ PNGs into `output`."""

  def __init__(self, output: str, detector, overlays: bool, masks: bool):
    self.output, self.detector, self.overlays, self.masks = output, detector, overlays, masks
    self.used = set()

  def __call__(self, row: dict, original: np.ndarray, amap: np.ndarray, mask: np.ndarray):
    stem = _unique_stem(row['path'], self.used)
    if self.overlays:
      vmax = self.detector.calibrations[row['category']].pixel_threshold * 2.0
      os.makedirs(os.path.join(self.output, 'overlays'), exist_ok=True)
      overlay_png(original, amap, mask, row, vmax, os.path.join(self.output, 'overlays', f'{stem}.png'))
    if self.masks:
      h, w = original.shape[:2]
      os.makedirs(os.path.join(self.output, 'masks'), exist_ok=True)
      big = _resized(mask.astype(np.uint8) * 255, (w, h), Image.NEAREST)
      Image.fromarray(big).save(os.path.join(self.output, 'masks', f'{stem}_mask.png'))


def write_tables(output: str, rows: list[dict]):
  """predictions.csv and predictions.jsonl in `output`."""
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, 'predictions.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, FIELDS)
    w.writeheader()
    w.writerows(rows)
  writers.atomic_write_text(
    os.path.join(output, 'predictions.jsonl'), ''.join(writers.dumps_json(r, indent=None) for r in rows)
  )


def folder_label_summary(rows: list[dict], good_name: str = 'good') -> dict:
  """Verdict accuracy, precision and recall against MVTec-layout folders (`good` = normal)."""
  scored = [r for r in rows if not r['error']]
  truth = np.array([os.path.basename(os.path.dirname(r['path'])) != good_name for r in scored])
  said = np.array([r['verdict'] == 'anomalous' for r in scored])
  tp = int(np.sum(truth & said))
  return {
    'images': len(scored),
    'accuracy': float(np.mean(truth == said)) if scored else float('nan'),
    'precision': tp / max(int(said.sum()), 1),
    'recall': tp / max(int(truth.sum()), 1),
  }


def _define_flags():
  """The command-line flags (defined only when this module runs as a program)."""
  flags.DEFINE_string('workdir', None, 'A finished run of python -m jaxad.main.')
  flags.DEFINE_string('input', None, 'An image folder (searched recursively), a file or a glob.')
  flags.DEFINE_string('output', None, 'Output folder (default <workdir>/predictions).')
  flags.DEFINE_string('category', None, 'Category to score as (needed for a unified model).')
  flags.DEFINE_bool('masks', False, 'Also write binary mask PNGs at the input size.')
  flags.DEFINE_bool('overlays', True, 'Write overlay PNGs.')
  flags.DEFINE_integer('batch_size', None, 'Images per jitted batch (default config.eval_batch_size).')
  flags.DEFINE_bool(
    'labels_from_folders', False, 'MVTec layout: images under a `good` folder are normal; report accuracy.'
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jaxad

  detector = jaxad.load(flags.FLAGS.workdir)
  paths = input_paths(flags.FLAGS.input)
  output = flags.FLAGS.output or os.path.join(flags.FLAGS.workdir, 'predictions')
  pictures = PictureWriter(output, detector, flags.FLAGS.overlays, flags.FLAGS.masks)
  rows = predict_paths(detector, paths, flags.FLAGS.category, flags.FLAGS.batch_size, on_scored=pictures)
  write_tables(output, rows)
  failed = [r['path'] for r in rows if r['error']]
  print(f'{len(rows) - len(failed)} of {len(rows)} images scored; {output}/predictions.csv')
  if flags.FLAGS.labels_from_folders:
    summary = folder_label_summary(rows, detector.config.dataset.good_name)
    writers.atomic_write_json(os.path.join(output, 'summary.json'), summary)
    print(json.dumps(summary))
  if failed:
    print(f'{len(failed)} file(s) could not be read: ' + ', '.join(failed), file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdir', 'input'])
  app.run(main)
