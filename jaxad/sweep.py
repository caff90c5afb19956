"""Hyperparameter sweeps: python -m jaxad.sweep --config configs/X.py[:arg] --sweep configs/sweeps/Y.py.

A sweep file defines `get_sweep(arg=None) -> list[dict]`: one dict of config overrides (dotted field ->
value) per point, usually `grid({...})` over a few fields. Every point runs once per seed, each in its
own workdir `<workdir>/<field=value,...>/seed_<s>` through `python -m jaxad.main`, so a rerun skips
finished runs (a readable metrics.json with a 'mean') and resumes unfinished ones from their checkpoints.
With `--vmap_seeds` each point runs once, with config.num_seeds = --seeds (all its seeds in one
vmapped program, jaxad/train.py), in `<workdir>/<field=value,...>`, which writes the same seed_<s>
folders.

Executors: `local` runs them here (`--parallel N` at a time), `print` prints one command per pending
run, `slurm` writes `<workdir>/sweep.sbatch`, an array job with one task per pending run. A run that
exits with `jaxad.PREEMPTED_EXIT_CODE` (stopped by a signal, checkpoint saved) is rerun to resume:
`local` reruns it up to --max_resumes times, the Slurm array task requeues itself. A sweep that gets
SIGTERM/SIGINT itself passes it on to its runs, starts nothing more and exits with that code too.
With `--parallel N` > 1 the local runs share the machine: `--devices_per_run K` gives run slot i its own
GPUs (CUDA_VISIBLE_DEVICES) when there are N*K of them, else the runs share the devices with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9/N; XLA_PYTHON_CLIENT_PREALLOCATE=false in both cases.
`python -m jaxad.report <workdir>` then aggregates the metrics (mean, std and 95 % CI over seeds, and
paired comparisons of points over matched seeds).
"""

import concurrent.futures
import importlib.util
import itertools
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading

from absl import app, flags

import jaxad
from jaxad import writers

_CONFIG = flags.DEFINE_string('config', None, 'Model config file, optionally with :arg (as jaxad.main).')
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (configs/sweeps/*.py), optionally with :arg.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory; default runs/sweeps/<sweep file name>.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Runs per point, with config.seed = 0 .. seeds-1.')
_VMAP_SEEDS = flags.DEFINE_bool(
  'vmap_seeds',
  False,
  'One run per point that trains all its seeds together (config.num_seeds = --seeds) instead of one '
  'run per seed; the same seed_<s> outputs.',
)
_EXECUTOR = flags.DEFINE_enum('executor', 'local', ['local', 'print', 'slurm'], 'Where runs go.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'local: runs at the same time.')
_DEVICES_PER_RUN = flags.DEFINE_integer(
  'devices_per_run',
  0,
  'local: GPUs per concurrent run (CUDA_VISIBLE_DEVICES per run slot); 0 = do not partition. With fewer '
  'than parallel * devices_per_run devices the runs share them.',
)
_VISIBLE_DEVICES = flags.DEFINE_list(
  'visible_devices',
  None,
  'local: GPU ids to partition; default $CUDA_VISIBLE_DEVICES, else the GPUs `nvidia-smi -L` lists.',
)
_MAX_RESUMES = flags.DEFINE_integer(
  'max_resumes', 3, 'local: reruns of a run that exits preempted (checkpoint saved), each resuming.'
)
_OVERRIDE = flags.DEFINE_multi_string(
  'override', [], 'field=value applied to every point (e.g. dataset.root=/data/mvtec).'
)
_SBATCH = flags.DEFINE_multi_string(
  'sbatch', [], 'slurm: extra #SBATCH options, e.g. --sbatch=--gres=gpu:1 --sbatch=--time=4:00:00.'
)
flags.mark_flags_as_required(['config', 'sweep'])


def grid(axes: dict) -> list[dict]:
  """All combinations of `{field: [values]}`, the last field varying fastest."""
  return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _load(path_and_arg: str, function: str):
  path, _, arg = path_and_arg.partition(':')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return getattr(module, function)(arg or None)


def format_value(value) -> str:
  """How a value is written on the jaxad.main command line (--config.field=<value>)."""
  return value if isinstance(value, str) else repr(value)


def parse_overrides(pairs: list[str]) -> dict:
  out = {}
  for pair in pairs:
    key, sep, value = pair.partition('=')
    if not sep:
      raise app.UsageError(f'--override {pair!r}: expected field=value')
    out[key] = value
  return out


def point_name(overrides: dict) -> str:
  """The workdir name of a point: its overrides as `field=value,...` (filesystem-safe)."""
  if not overrides:
    return 'default'
  text = ','.join(f'{k}={format_value(v)}' for k, v in overrides.items())
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', text)


def check_fields(config, overrides: dict, where: str):
  for key in overrides:
    node = config
    for part in key.split('.'):
      if part not in node:
        raise KeyError(f'{where}: config has no field {key!r}')
      node = node[part]


def plan(
  config_arg: str, points: list[dict], seeds: int, workdir: str, base: dict, vmap_seeds: bool = False
) -> list[dict]:
  """One entry per (point, seed), or per point with `vmap_seeds`: its workdir, overrides, seeds, the
  folders its metrics.json files go to (`outputs`, one per seed) and its jaxad.main arguments."""
  runs = []
  for overrides in points:
    name = point_name(overrides)
    point_dir = os.path.join(workdir, name)
    seed_dirs = [os.path.join(point_dir, f'seed_{seed}') for seed in range(seeds)]
    if vmap_seeds:
      groups = [(point_dir, list(range(seeds)), seed_dirs, {'seed': '0', 'num_seeds': str(seeds)})]
    else:
      groups = [(d, [seed], [d], {'seed': str(seed)}) for seed, d in enumerate(seed_dirs)]
    for run_dir, run_seeds, outputs, seed_values in groups:
      values = {**base, **{k: format_value(v) for k, v in overrides.items()}, **seed_values}
      runs.append(
        {
          'point': name,
          'overrides': overrides,
          'seeds': run_seeds,
          'outputs': outputs,
          'workdir': run_dir,
          'args': [
            '-m',
            'jaxad.main',
            '--config',
            config_arg,
            '--workdir',
            run_dir,
            *(f'--config.{k}={v}' for k, v in values.items()),
          ],
        }
      )
  return runs


def finished(run: dict) -> bool:
  """Whether every metrics.json of `run` (in its `outputs`, default its workdir) is complete (readable,
  valid JSON with a 'mean' dict)."""
  for out in run.get('outputs', [run['workdir']]):
    try:
      writers.read_metrics(os.path.join(out, 'metrics.json'))
    except ValueError:
      return False
  return True


def visible_devices() -> list[str]:
  """The GPU ids runs can use: $CUDA_VISIBLE_DEVICES if set, else one per `nvidia-smi -L` line, else []."""
  env = os.environ.get('CUDA_VISIBLE_DEVICES')
  if env is not None:
    return [d.strip() for d in env.split(',') if d.strip()]
  if shutil.which('nvidia-smi') is None:
    return []
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i in range(sum(line.startswith('GPU ') for line in out.splitlines()))]


def slot_environments(parallel: int, devices: list[str], devices_per_run: int) -> list[dict]:
  """The environment variables of each of `parallel` run slots.

  With `devices_per_run` > 0 and at least parallel * devices_per_run `devices`, slot i gets
  CUDA_VISIBLE_DEVICES = devices[i * devices_per_run : (i + 1) * devices_per_run]. Otherwise, with
  `parallel` > 1, the slots share the devices and get XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / parallel.
  XLA_PYTHON_CLIENT_PREALLOCATE=false whenever `parallel` > 1.
  """
  k = devices_per_run
  if k > 0 and len(devices) >= parallel * k:
    envs = [{'CUDA_VISIBLE_DEVICES': ','.join(devices[i * k : (i + 1) * k])} for i in range(parallel)]
  else:
    if k > 0:
      print(
        f'Warning: --devices_per_run={k} x --parallel={parallel} needs {parallel * k} devices, found '
        f'{len(devices)} ({",".join(devices) or "none"}); the runs share them.',
        file=sys.stderr,
      )
    fraction = {'XLA_PYTHON_CLIENT_MEM_FRACTION': f'{0.9 / parallel:.4g}'} if parallel > 1 else {}
    envs = [dict(fraction) for _ in range(parallel)]
  if parallel > 1:
    for env in envs:
      env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  return envs


class LocalExecutor:
  """Runs sweep runs here as `python <args>` subprocesses, each logging to <workdir>/output.log.

  A run that exits with `jaxad.PREEMPTED_EXIT_CODE` is rerun (resuming from its checkpoint) up to
  `max_resumes` times, in the same slot (same devices). After `stop(signum)` (the sweep itself got
  SIGTERM/SIGINT) the signal is passed on to the running runs and nothing is started or rerun.
  `run_all` runs each run in a free slot whose environment is `slot_environments(parallel, devices,
  devices_per_run)`; a run's output.log header line names its slot and those variables.
  """

  def __init__(
    self,
    max_resumes: int = 3,
    command: tuple[str, ...] = (sys.executable,),
    devices: tuple[str, ...] = (),
    devices_per_run: int = 0,
  ):
    self.max_resumes = max_resumes
    self.command = list(command)
    self.devices = list(devices)
    self.devices_per_run = devices_per_run
    self.stopped = threading.Event()
    self._lock = threading.RLock()  # stop() runs in a signal handler and may interrupt itself.
    self._procs = set()
    self._slot_envs = [{}]
    self._slots = None  # Free slot numbers while run_all runs; a direct call runs in slot 0.

  def stop(self, signum: int):
    self.stopped.set()
    with self._lock:
      for proc in self._procs:
        proc.send_signal(signum)

  def _start(self, run: dict, log, slot: int, first: bool) -> subprocess.Popen | None:
    with self._lock:
      if self.stopped.is_set():
        return None
      extra = self._slot_envs[slot]
      if first:
        settings = ' '.join(f'{k}={v}' for k, v in sorted(extra.items()))
        if 'CUDA_VISIBLE_DEVICES' not in extra:
          inherited = os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')
          settings = f'{settings} CUDA_VISIBLE_DEVICES={inherited} (inherited)'.strip()
        log.write(f'[jaxad.sweep] Run {run["workdir"]} in slot {slot}: {settings}\n')
        log.flush()
      proc = subprocess.Popen(
        [*self.command, *run['args']], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **extra}
      )
      self._procs.add(proc)
      return proc

  def __call__(self, run: dict) -> int | None:
    """Runs `run` to its end in a free slot; its last exit code, or None if the sweep stopped first."""
    slots = self._slots
    if slots is None:
      return self._run(run, 0)
    slot = slots.get()
    try:
      return self._run(run, slot)
    finally:
      slots.put(slot)

  def _run(self, run: dict, slot: int) -> int | None:
    os.makedirs(run['workdir'], exist_ok=True)
    code = None
    with open(os.path.join(run['workdir'], 'output.log'), 'a') as log:
      for attempt in range(self.max_resumes + 1):
        proc = self._start(run, log, slot, attempt == 0)
        if proc is None:
          return code
        code = proc.wait()
        with self._lock:
          self._procs.discard(proc)
        if code != jaxad.PREEMPTED_EXIT_CODE or self.stopped.is_set() or attempt == self.max_resumes:
          return code
        log.write(f'[jaxad.sweep] Preempted (exit {code}); resuming ({attempt + 1} of {self.max_resumes}).\n')
        log.flush()
    return code

  def run_all(self, runs: list[dict], parallel: int) -> list[int | None]:
    """Runs `runs`, `parallel` at a time, each in a free slot; their exit codes (None: not started)."""
    self._slot_envs = slot_environments(parallel, self.devices, self.devices_per_run)
    self._slots = queue.SimpleQueue()
    for slot in range(parallel):
      self._slots.put(slot)
    try:
      with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(self, runs))
    finally:
      self._slots, self._slot_envs = None, [{}]


def run_local(
  runs: list[dict], parallel: int, max_resumes: int, devices: tuple[str, ...] = (), devices_per_run: int = 0
) -> None:
  """Runs `runs` here with a `LocalExecutor`; lists the unfinished ones and exits if there are any.

  `devices` and `devices_per_run` set each of the `parallel` run slots' GPUs (`slot_environments`).

  SIGTERM/SIGINT sent to the sweep (main thread) are passed on to its runs, which save a checkpoint
  and stop. The exit code is `jaxad.PREEMPTED_EXIT_CODE` if every unfinished run was preempted or not
  started (rerun the sweep to resume), else 1.
  """
  executor = LocalExecutor(max_resumes, devices=devices, devices_per_run=devices_per_run)
  handlers = {}
  if threading.current_thread() is threading.main_thread():
    for s in (signal.SIGTERM, signal.SIGINT):
      handlers[s] = signal.signal(s, lambda signum, _: executor.stop(signum))
  try:
    codes = executor.run_all(runs, parallel)
  finally:
    for s, handler in handlers.items():
      signal.signal(s, handler)
  unfinished = [(r, c) for r, c in zip(runs, codes) if not finished(r)]
  if not unfinished:
    return
  preempted = jaxad.PREEMPTED_EXIT_CODE
  reasons = {
    None: 'not started (the sweep was stopped)',
    preempted: f'preempted (exit {preempted}), checkpoint saved'
    + ('' if executor.stopped.is_set() else f'; still preempted after {max_resumes} resumes'),
    0: 'exit 0 without a complete metrics.json',
  }
  print(
    f'{len(unfinished)} of {len(runs)} runs did not finish (see output.log in each):\n'
    + '\n'.join(f'  {r["workdir"]}: {reasons.get(c, f"exit {c}")}' for r, c in unfinished),
    file=sys.stderr,
  )
  if all(c in (None, preempted) for _, c in unfinished):
    print('Rerun the sweep to resume them.', file=sys.stderr)
    raise SystemExit(preempted)
  raise SystemExit(1)


def slurm_script(runs: list[dict], workdir: str, options: list[str]) -> str:
  """An array job with one task per run; a task whose run exits preempted requeues itself."""
  commands = '\n'.join('  ' + shlex.quote(shlex.join(['python', *r['args']])) for r in runs)
  directives = '\n'.join(f'#SBATCH {o}' for o in options)
  code = jaxad.PREEMPTED_EXIT_CODE
  return (
    f'#!/bin/bash\n#SBATCH --job-name=jaxad-sweep\n#SBATCH --array=0-{len(runs) - 1}\n'
    f'#SBATCH --chdir={os.getcwd()}\n#SBATCH --output={os.path.abspath(workdir)}/slurm-%A_%a.out\n'
    f'#SBATCH --open-mode=append\n#SBATCH --requeue\n'
    f'{directives}\n'
    f'# One task per pending run of the sweep (written by python -m jaxad.sweep). A run that exits with\n'
    f'# {code} (stopped by a signal, checkpoint saved) is requeued and resumes.\n'
    f'set -euo pipefail\nCOMMANDS=(\n{commands}\n)\n'
    f'trap \'echo "jaxad-sweep: got SIGTERM, waiting for the run to save its checkpoint" >&2\' TERM\n'
    f'status=0\n'
    f'eval "${{COMMANDS[$SLURM_ARRAY_TASK_ID]}}" || status=$?\n'
    f'if (( status == {code} )); then\n'
    f'  echo "jaxad-sweep: preempted (exit {code}, checkpoint saved); requeueing'
    f' ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}" >&2\n'
    f'  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"\n'
    f'  exit 0\n'
    f'fi\n'
    f'exit "$status"\n'
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sys.modules.setdefault('jaxad.sweep', sys.modules[__name__])  # Sweep files import `grid` from here.
  config = _load(_CONFIG.value, 'get_config')
  points = _load(_SWEEP.value, 'get_sweep')
  base = parse_overrides(_OVERRIDE.value)
  check_fields(config, base, '--override')
  for p in points:
    check_fields(config, p, _SWEEP.value)
  workdir = _WORKDIR.value or os.path.join(
    'runs', 'sweeps', os.path.splitext(os.path.basename(_SWEEP.value.partition(':')[0]))[0]
  )
  runs = plan(_CONFIG.value, points, _SEEDS.value, workdir, base, _VMAP_SEEDS.value)
  os.makedirs(workdir, exist_ok=True)
  writers.atomic_write_json(
    os.path.join(workdir, 'sweep.json'),
    {
      'config': _CONFIG.value,
      'sweep': _SWEEP.value,
      'seeds': _SEEDS.value,
      'base': base,
      'fields': list(dict.fromkeys(k for p in points for k in p)),
      'vmap_seeds': _VMAP_SEEDS.value,
      'runs': [
        {'point': r['point'], 'overrides': r['overrides'], 'seed': seed, 'dir': os.path.relpath(out, workdir)}
        for r in runs
        for seed, out in zip(r['seeds'], r['outputs'])
      ],
    },
  )
  pending = [r for r in runs if not finished(r)]
  print(
    f'{len(runs)} runs ({len(points)} points x {_SEEDS.value} seeds'
    f'{", the seeds of a point in one run" if _VMAP_SEEDS.value else ""}), {len(runs) - len(pending)} '
    f'finished, {len(pending)} to run.',
    file=sys.stderr,
  )
  if not pending:
    return
  if _EXECUTOR.value == 'print':
    for r in pending:
      print(shlex.join(['python', *r['args']]))
  elif _EXECUTOR.value == 'slurm':
    path = os.path.join(workdir, 'sweep.sbatch')
    writers.atomic_write_text(path, slurm_script(pending, workdir, _SBATCH.value))
    print(f'Wrote {path}; submit with: sbatch {path}')
  else:
    devices = visible_devices() if _VISIBLE_DEVICES.value is None else _VISIBLE_DEVICES.value
    run_local(pending, _PARALLEL.value, _MAX_RESUMES.value, devices, _DEVICES_PER_RUN.value)
    print(f'All {len(runs)} runs finished in {workdir}', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
