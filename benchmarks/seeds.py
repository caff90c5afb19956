"""K seeds in one vmapped program (config.num_seeds = K) against K sequential runs; JSON lines.

  python benchmarks/seeds.py --models mean_image,sivt,vit_memae,mask_vitgan --seeds 1,2,4,8 --steps 30

For each model's default config (configs/<model>.py) and each K: `vmapped` sets up one run with
num_seeds = K through the harness (`train.setup`: K inits, one compile, the stacked grain iterator)
and trains --steps steps; `sequential` sets up and trains K single runs of seeds 0 .. K-1 one after
the other, each with its own setup and compile, as K processes without a warm compilation cache would.
The training set is --steps x batch uniform random images (one epoch of --steps steps, plus the
untimed first step that compiles), fed through the harness's input pipeline.

Each line: model, K, mode, batch, steps, wall_s (setup + compile + every step: the whole time to train
all K seeds), steps_s (the timed steps after the first; for sequential the sum over the K runs),
img_per_s (K x steps x batch / steps_s: images of all replicas per second) and img_per_s_per_replica
(img_per_s / K); after both modes a line with mode 'ratio': wall_s and steps_s of sequential over
vmapped. Persistent compilation cache off.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import mask_vitgan, mean_image, sivt, vit_memae  # noqa: E402
from jaxad import parallel, train  # noqa: E402
from jaxad.data import pipeline  # noqa: E402

_CONFIGS = {m.__name__.split('.')[-1]: m for m in (mean_image, sivt, vit_memae, mask_vitgan)}
_MODELS = flags.DEFINE_list('models', list(_CONFIGS), 'Models (their default configs).')
_SEEDS = flags.DEFINE_list('seeds', ['1', '2', '4', '8'], 'Values of K.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed training steps per run (after the compiling one).')
_OUT = flags.DEFINE_string('out', None, 'Also append the JSON lines to this file.')


def _source(config, steps: int):
  rng = np.random.default_rng(0)
  n, size, channels = config.batch_size * (steps + 1), config.dataset.image_size, config.dataset.channels
  images = {
    'image': rng.uniform(0, 1, (n, size, size, channels)).astype(np.float32),
    'label': np.zeros(n, np.int32),
    'mask': np.zeros((n, size, size), np.uint8),
    'index': np.arange(n, dtype=np.int32),
  }
  return pipeline.ArraySource(images, name='seeds-benchmark')


def _train(config, source, mesh) -> tuple[float, float]:
  """(wall seconds of setup + every step, seconds of the steps after the first) of one run."""
  t0 = time.perf_counter()
  run = train.setup(config, source, mesh)
  jax.block_until_ready(run.step(0, run.next_batch()))
  t1 = time.perf_counter()
  for step in range(1, run.total):
    metrics = run.step(step, run.next_batch())
  jax.block_until_ready((run.state, metrics))
  t2 = time.perf_counter()
  return t2 - t0, t2 - t1


def measure(model: str, k: int, steps: int) -> list[dict]:
  mesh = parallel.make_mesh()
  config = _CONFIGS[model].get_config()
  config.num_epochs = 1
  source = _source(config, steps)
  common = {'model': model, 'K': k, 'batch': config.batch_size, 'steps': steps}
  vmapped = config.copy_and_resolve_references()
  vmapped.num_seeds = k
  wall, steps_s = _train(vmapped, source, mesh)
  records = [{**common, 'mode': 'vmapped', 'wall_s': wall, 'steps_s': steps_s}]
  runs = []
  for seed in range(k):
    single = config.copy_and_resolve_references()
    single.seed = seed
    runs.append(_train(single, source, mesh))
  records.append(
    {**common, 'mode': 'sequential', 'wall_s': sum(w for w, _ in runs), 'steps_s': sum(s for _, s in runs)}
  )
  for r in records:
    r['img_per_s'] = k * steps * config.batch_size / r['steps_s']
    r['img_per_s_per_replica'] = r['img_per_s'] / k
  seq, vm = records[1], records[0]
  records.append(
    {
      **common,
      'mode': 'ratio',
      'wall_s': seq['wall_s'] / vm['wall_s'],
      'steps_s': seq['steps_s'] / vm['steps_s'],
    }
  )
  return records


def main(argv):
  del argv
  jax.config.update('jax_enable_compilation_cache', False)
  device = {'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count()}
  for model in _MODELS.value:
    for k in map(int, _SEEDS.value):
      for record in measure(model, k, _STEPS.value):
        line = json.dumps({**record, **device, 'jax_version': jax.__version__})
        print(line, flush=True)
        if _OUT.value:
          with open(_OUT.value, 'a') as f:
            f.write(line + '\n')


if __name__ == '__main__':
  app.run(main)
