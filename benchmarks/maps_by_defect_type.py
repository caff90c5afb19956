"""Where does a trained run fail? Image and pixel AUROC per defect type, under each `config.anomaly_map`.

    python benchmarks/maps_by_defect_type.py --workdir runs/mvg_mtd --root $JAXAD_REALAD/mtd_full \
        --category magnetic_tile
    python benchmarks/maps_by_defect_type.py --workdir runs/sivt --category screw_plate  # embedded data

Loads the detector a finished `python -m jaxad.main` run left in `--workdir` (jaxad.load), scores the
test split of `--category` under `--root` (MVTec layout) and prints, for the model's own maps and for
the deviation maps (|map - mean| / std per pixel against the category's training maps, as
`config.anomaly_map='deviation'`), the pixel AUROC of all test images and of the good images with each
defect type alone, with each type's share of the defect pixels, and the image AUROC of the run's own
image scores on the same images; then the pixel AUROC of all defect pixels against the good images'
pixels alone and against the defect-free pixels of the defective images alone. Runs scored with either
setting work: the training maps' statistics are computed here.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import jaxad  # noqa: E402
from jaxad import calibration, metrics  # noqa: E402
from jaxad.data import folder, synthetic  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run.', required=True)
_ROOT = flags.DEFINE_string(
  'root', '', 'MVTec-layout folder with the test split (default: the embedded dataset).'
)
_CATEGORY = flags.DEFINE_string('category', None, 'Category folder under --root.', required=True)


def model_maps(detector, samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(the model's own maps [N, S, S], ground-truth masks [N, S, S], image scores [N]) of `samples`."""
  pairs = [
    folder.load_pair(s.image_path, s.mask_path, detector.image_size, detector.channels) for s in samples
  ]
  images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]) > 0
  prediction = detector.predict(images, category=_CATEGORY.value)
  return np.asarray(prediction.maps, np.float64), masks, np.asarray(prediction.scores)


def main(argv):
  del argv
  detector = jaxad.load(_WORKDIR.value)
  calib = detector.calibrations[_CATEGORY.value]
  detector.calibrations[_CATEGORY.value] = dataclasses.replace(calib, anomaly_map='model')
  root = _ROOT.value or synthetic.ensure()
  tests = folder.scan_split(root, _CATEGORY.value, 'test')
  maps, masks, scores = model_maps(detector, tests)
  normal, _, _ = model_maps(detector, folder.scan_split(root, _CATEGORY.value, 'train'))
  variants = {
    'model': maps,
    'deviation': calibration.pixel_maps(maps, 'deviation', *calibration.zscore_stats(normal)),
  }
  types = np.array([s.defect_type for s in tests])
  good = types == 'good'
  columns = [*variants, 'image']
  print(f'{"test images":24s} {"defect pixels":>14s} ' + ' '.join(f'{c:>10s}' for c in columns))
  rows = [('all', np.ones(len(tests), bool))] + [(t, good | (types == t)) for t in sorted(set(types[~good]))]
  for name, sel in rows:
    share = masks[sel].sum() / masks.sum()
    aurocs = ' '.join(f'{100 * metrics.pixel_auroc(m[sel], masks[sel]):10.1f}' for m in variants.values())
    image = 100 * metrics.image_auroc(scores[sel], ~good[sel])
    print(f'{("good + " + name) if name != "all" else "all":24s} {100 * share:13.1f}% {aurocs} {image:10.1f}')
  # The pooled pixel AUROC split by where its negatives lie: on good images, or on the defective images
  # around the defects (a map raised over a whole defective image ranks it well and its defects poorly).
  good_pixels = np.broadcast_to(good[:, None, None], masks.shape) & ~masks
  for name, negatives in (('good images', good_pixels), ('defect images', ~good_pixels & ~masks)):
    labels = np.r_[np.ones(masks.sum(), bool), np.zeros(negatives.sum(), bool)]
    aurocs = ' '.join(
      f'{100 * metrics.image_auroc(np.r_[m[masks], m[negatives]], labels):10.1f}' for m in variants.values()
    )
    print(f'{"defects vs " + name:24s} {100.0:13.1f}% {aurocs}')


if __name__ == '__main__':
  app.run(main)
