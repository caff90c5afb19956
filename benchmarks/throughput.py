"""Train and inference throughput of one model on the devices JAX sees; prints one JSON line.

  python benchmarks/throughput.py --config configs/sivt.py:paper --batch 64 --steps 20 \
      --config.backbone.weights=efficientnet_b4.npz --config.dtype=auto

The model is built and stepped by the harness's own `train.setup` (model, ('data',) mesh, batch
sharding, initial state, compiled steps) on one synthetic batch of uniform random images of the
configured shape, fed as the harness feeds it: through its grain iterator and, for frozen-backbone
models with `backbone.cache_features` and no augmentation or quarter turns alone, as the cached
`precompute` outputs (e.g. SIVT's 'features'). The input pipeline itself is not timed, so artificial
defects (RB-AE) are filled procedurally whatever `defects.fill` says: a `:paper` config's fill folder
is not needed.

Compile times: `lower_s` traces and lowers the train step, `xla_compile_s` compiles it, or loads it
when JAX's persistent compilation cache (`compilation_cache_dir` in the record) already holds it;
`score_lower_s` and `score_xla_compile_s` the same for the score step; each also as this process's CPU
seconds (`*_cpu_s`: less sensitive to other jobs on a shared host). `--compile_only` stops there:

  python benchmarks/throughput.py --config configs/tmirn.py:paper --compile_only

Times: the median over --repeats of the seconds per step of --steps back-to-back steps, after
--warmup steps, synchronised with block_until_ready. Inference times the model's `score`.
FLOPs per step come from XLA's cost analysis of the compiled step (which sees nothing inside custom
calls such as cuDNN fused attention) or, for models with an analytic count (SIVT, jaxad.perf), from
that count (--flops=auto prefers it). MFU = (FLOPs per step / step time) / (peak FLOP/s of the devices
at the compute dtype, jaxad.perf); null where the peak is unknown (CPUs).
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxad import models, parallel, perf, train  # noqa: E402
from jaxad.data import pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Model config file.', lock_config=False)
_BATCH = flags.DEFINE_integer('batch', None, 'Global batch size (default: config.batch_size).')
_STEPS = flags.DEFINE_integer('steps', 20, 'Back-to-back steps per timed repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median is reported.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_FLOPS = flags.DEFINE_enum(
  'flops',
  'auto',
  ['auto', 'xla', 'analytic'],
  'FLOPs per step for MFU: analytic where the model has a count, else XLA.',
)
_PHASE = flags.DEFINE_string(
  'phase', None, 'Phase to time for models with config.phases (default: the last).'
)
_COMPILE_ONLY = flags.DEFINE_bool(
  'compile_only',
  False,
  'Only lower and compile the train and score steps and report the times (no steps run).',
)
flags.mark_flags_as_required(['config'])

# Analytic (train, score) FLOPs per image, for models whose steps XLA's cost analysis cannot see into.
_ANALYTIC = {'sivt': (perf.sivt_train_flops, perf.sivt_score_flops)}


def _peak_memory() -> int | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get('peak_bytes_in_use') for s in stats if s]
  return max(peaks) if peaks and None not in peaks else None


def _compile(fn, *args, prefix: str = '') -> tuple:
  """(compiled, {lower_s, xla_compile_s: wall seconds to trace and lower, for XLA to compile or load
  from the cache; lower_cpu_s, xla_compile_cpu_s: this process's CPU seconds of each}), keys prefixed."""
  c0, t0 = time.process_time(), time.perf_counter()
  lowered = fn.lower(*args)
  c1, t1 = time.process_time(), time.perf_counter()
  compiled = lowered.compile()
  c2, t2 = time.process_time(), time.perf_counter()
  times = {'lower_s': t1 - t0, 'xla_compile_s': t2 - t1, 'lower_cpu_s': c1 - c0, 'xla_compile_cpu_s': c2 - c1}
  return compiled, {prefix + k: v for k, v in times.items()}


def _scoring_state(model, model_state, batch, frozen):
  """`model_state` as `score` takes it: with zero reference statistics where the model has a
  `reference` hook (the timing does not depend on their values)."""
  if model.reference is None:
    return model_state
  shapes = jax.eval_shape(model.reference, model_state, batch, frozen)
  return models.with_reference(model_state, {k: np.zeros(v.shape[1:]) for k, v in shapes.items()})


def measure(
  config,
  batch_size: int,
  steps: int,
  repeats: int,
  warmup: int,
  flops_source: str = 'auto',
  phase: str | None = None,
  compile_only: bool = False,
) -> dict:
  """The JSON record of one model (see the module docstring); only compile times if `compile_only`."""
  config.batch_size = config.eval_batch_size = batch_size
  config.defects.fill = 'procedural'  # The pipeline is not timed; fill='folder' would need a folder.
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(config.seed)
  size, channels = config.dataset.image_size, config.dataset.channels
  images = {
    'image': rng.uniform(0, 1, (batch_size, size, size, channels)).astype(np.float32),
    'label': np.zeros(batch_size, np.int32),
    'mask': np.zeros((batch_size, size, size), np.uint8),
    'index': np.arange(batch_size, dtype=np.int32),
  }
  run = train.setup(config, pipeline.ArraySource(images, name='throughput-synthetic'), mesh)
  model, frozen, train_key = run.model, run.frozen, run.train_key
  cached = bool(model.cached_keys) and 'image' not in run.source[0]  # Steps read cached features.
  batch = run.next_batch()
  phase = phase or run.schedule[-1][0]
  step, train_times = _compile(run.steps[phase], run.state, batch, frozen, train_key)
  eval_batch = parallel.shard_batch(images, mesh)
  score_fn = jax.jit(model.score, out_shardings=parallel.replicated(mesh))
  score, score_times = _compile(
    score_fn, _scoring_state(model, run.state.model, eval_batch, frozen), eval_batch, frozen, prefix='score_'
  )
  compiled = {
    'model': config.model.name,
    'device_kind': jax.devices()[0].device_kind,
    'batch': batch_size,
    'phase': phase,
    'compile_s': train_times['lower_s'] + train_times['xla_compile_s'],
    **train_times,
    **score_times,
    'compilation_cache_dir': jax.config.jax_compilation_cache_dir,
    'jax_version': jax.__version__,
  }
  if compile_only:
    return compiled
  state = run.state

  def train_once():
    nonlocal state
    state, metrics = step(state, batch, frozen, train_key)
    return metrics

  for _ in range(warmup):
    jax.block_until_ready(train_once())
  train_s = perf.median_seconds(train_once, steps, repeats)

  scoring_state = _scoring_state(model, state.model, eval_batch, frozen)
  for _ in range(warmup):
    jax.block_until_ready(score(scoring_state, eval_batch, frozen))
  infer_s = perf.median_seconds(lambda: score(scoring_state, eval_batch, frozen), steps, repeats)

  xla_train, xla_infer = perf.xla_flops(step), perf.xla_flops(score)
  analytic_train = analytic_infer = None
  if config.model.name in _ANALYTIC:
    train_fn, score_fn_flops = _ANALYTIC[config.model.name]
    backbone = 0.0
    if model.precompute is not None:  # Convolutions only: XLA's count is good for them.
      pre, *_ = _compile(jax.jit(model.precompute), {'image': eval_batch['image']}, frozen)
      backbone = (perf.xla_flops(pre) or 0.0) / batch_size
    analytic_train = batch_size * (train_fn(config) + (0.0 if cached else backbone))
    analytic_infer = batch_size * (score_fn_flops(config) + backbone)
  use_analytic = flops_source == 'analytic' or (flops_source == 'auto' and analytic_train is not None)
  if flops_source == 'analytic' and analytic_train is None:
    raise ValueError(f'No analytic FLOP count for model {config.model.name!r}; use --flops=xla.')
  train_flops = analytic_train if use_analytic else xla_train
  infer_flops = analytic_infer if use_analytic else xla_infer

  device = jax.devices()[0]
  dtype = models.compute_dtype(config.dtype).name
  peak = perf.peak_flops(device.device_kind, dtype)
  n = jax.device_count()
  return {
    **compiled,
    'platform': device.platform,
    'num_devices': n,
    'dtype': dtype,
    'attention_implementation': config.get('attention_implementation'),
    'cached_features': cached,
    'train_img_per_s': batch_size / train_s,
    'infer_img_per_s': batch_size / infer_s,
    'train_step_ms': 1e3 * train_s,
    'infer_step_ms': 1e3 * infer_s,
    'infer_compile_s': score_times['score_lower_s'] + score_times['score_xla_compile_s'],
    'peak_memory_bytes': _peak_memory(),
    'flops_source': 'analytic' if use_analytic else 'xla',
    'train_flops_per_step': train_flops,
    'infer_flops_per_step': infer_flops,
    'train_flops_per_step_xla': xla_train,
    'infer_flops_per_step_xla': xla_infer,
    'train_flops_per_step_analytic': analytic_train,
    'infer_flops_per_step_analytic': analytic_infer,
    'peak_flops_per_device': peak,
    'train_mfu': perf.mfu(train_flops, train_s, peak, n),
    'infer_mfu': perf.mfu(infer_flops, infer_s, peak, n),
    'steps': steps,
    'repeats': repeats,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  record = measure(
    config,
    _BATCH.value or config.batch_size,
    _STEPS.value,
    _REPEATS.value,
    _WARMUP.value,
    _FLOPS.value,
    _PHASE.value,
    _COMPILE_ONLY.value,
  )
  record = {'config': config_flags.get_config_filename(flags.FLAGS['config']), **record}
  if jax.process_index() == 0:
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  app.run(main)
