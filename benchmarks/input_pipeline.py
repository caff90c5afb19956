"""Input-pipeline throughput (images/s): MVTec-layout folder vs the same data prepared as TFDS ArrayRecord.

python benchmarks/input_pipeline.py --root $JAXAD_REALAD/mvtec_ad --category bottle \
    --image_size 256 --workers 0,2

Times the training iterator alone (decode, resize, shuffle, batch; no model) over `--epochs` epochs
after its first batch, and the one-off preparation of the TFDS files. With workers=0 it also reports
images per CPU second of the process, which other jobs on the machine do not distort.
"""

import argparse
import os
import sys
import tempfile
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402
from jaxad.data import pipeline  # noqa: E402


def _config(args, name, tfds_dir, workers):
  c = common.get_config()
  c.dataset.name = name
  c.dataset.root = args.root
  c.dataset.categories = args.category
  c.dataset.image_size = args.image_size
  c.dataset.tfds_dir = tfds_dir
  c.dataset.num_workers = workers
  c.batch_size = args.batch_size
  c.num_epochs = args.epochs + 1
  return c


def throughput(config) -> tuple[float, float]:
  """(images per wall-clock second, images per CPU second of this process: with workers=0 all the
  work, and robust to other jobs sharing the machine)."""
  root = pipeline.dataset_root(config)
  samples = [s for c in pipeline.categories(config, root) for s in pipeline.scan(config, root, c, 'train')]
  it = pipeline.train_iterator(
    pipeline.image_source(config, samples), config, process_index=0, process_count=1
  )
  next(it)  # Start-up (worker processes, file opening) is not throughput.
  n = (len(samples) * (config.num_epochs - 1)) // config.batch_size
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(n):
    next(it)
  images = n * config.batch_size
  return images / (time.perf_counter() - t0), images / (time.process_time() - c0)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--root', required=True)
  p.add_argument('--category', default='bottle')
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--epochs', type=int, default=2)
  p.add_argument('--workers', default='0', help='Comma-separated grain worker counts.')
  p.add_argument('--tfds_dir', default='', help="Prepared data dir ('' = a fresh temporary one).")
  args = p.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags.
  with tempfile.TemporaryDirectory() as tmp:
    tfds_dir = args.tfds_dir or tmp
    t0 = time.perf_counter()
    pipeline._prepared(_config(args, 'tfds', tfds_dir, 0))
    print(f'prepare {args.category} at {args.image_size}px: {time.perf_counter() - t0:.1f} s')
    for workers in map(int, args.workers.split(',')):
      for name in ('folder', 'tfds'):
        wall, cpu = throughput(_config(args, name, tfds_dir, workers))
        print(
          f'{name:6s} workers={workers}: {wall:8.1f} images/s'
          + (f', {cpu:8.1f} images per CPU second' if workers == 0 else '')
        )


if __name__ == '__main__':
  main()
