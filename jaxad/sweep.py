"""Hyperparameter sweeps: python -m jaxad.sweep --config configs/X.py[:arg] --sweep configs/sweeps/Y.py.

A sweep file defines `get_sweep(arg=None) -> list[dict]`: one dict of config overrides (dotted field ->
value) per point, usually `grid({...})` over a few fields. Every point runs once per seed, each in its
own workdir `<workdir>/<field=value,...>/seed_<s>` through `python -m jaxad.main`, so a rerun skips
finished runs (metrics.json present) and resumes unfinished ones from their checkpoints.

Executors: `local` runs them here (`--parallel N` at a time), `print` prints one command per pending
run, `slurm` writes `<workdir>/sweep.sbatch`, an array job with one task per pending run.
`python -m jaxad.report <workdir>` then aggregates the metrics (mean +/- std over seeds).
"""

import concurrent.futures
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys

from absl import app, flags

_CONFIG = flags.DEFINE_string('config', None, 'Model config file, optionally with :arg (as jaxad.main).')
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (configs/sweeps/*.py), optionally with :arg.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory; default runs/sweeps/<sweep file name>.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Runs per point, with config.seed = 0 .. seeds-1.')
_EXECUTOR = flags.DEFINE_enum('executor', 'local', ['local', 'print', 'slurm'], 'Where runs go.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'local: runs at the same time.')
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


def plan(config_arg: str, points: list[dict], seeds: int, workdir: str, base: dict) -> list[dict]:
  """One entry per (point, seed): its workdir, overrides and jaxad.main arguments."""
  runs = []
  for overrides in points:
    name = point_name(overrides)
    for seed in range(seeds):
      run_dir = os.path.join(workdir, name, f'seed_{seed}')
      values = {**base, **{k: format_value(v) for k, v in overrides.items()}, 'seed': str(seed)}
      runs.append(
        {
          'point': name,
          'overrides': overrides,
          'seed': seed,
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
  return os.path.exists(os.path.join(run['workdir'], 'metrics.json'))


def _run_local(run: dict) -> int:
  os.makedirs(run['workdir'], exist_ok=True)
  with open(os.path.join(run['workdir'], 'output.log'), 'a') as log:
    return subprocess.run([sys.executable, *run['args']], stdout=log, stderr=subprocess.STDOUT).returncode


def slurm_script(runs: list[dict], workdir: str, options: list[str]) -> str:
  commands = '\n'.join('  ' + shlex.quote(shlex.join(['python', *r['args']])) for r in runs)
  directives = '\n'.join(f'#SBATCH {o}' for o in options)
  return (
    f'#!/bin/bash\n#SBATCH --job-name=jaxad-sweep\n#SBATCH --array=0-{len(runs) - 1}\n'
    f'#SBATCH --chdir={os.getcwd()}\n#SBATCH --output={os.path.abspath(workdir)}/slurm-%A_%a.out\n'
    f'{directives}\n'
    f'# One task per pending run of the sweep (written by python -m jaxad.sweep).\n'
    f'set -euo pipefail\nCOMMANDS=(\n{commands}\n)\n'
    f'eval "${{COMMANDS[$SLURM_ARRAY_TASK_ID]}}"\n'
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
  runs = plan(_CONFIG.value, points, _SEEDS.value, workdir, base)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(
      {
        'config': _CONFIG.value,
        'sweep': _SWEEP.value,
        'seeds': _SEEDS.value,
        'base': base,
        'fields': list(dict.fromkeys(k for p in points for k in p)),
        'runs': [
          {
            'point': r['point'],
            'overrides': r['overrides'],
            'seed': r['seed'],
            'dir': os.path.relpath(r['workdir'], workdir),
          }
          for r in runs
        ],
      },
      f,
      indent=2,
    )
  pending = [r for r in runs if not finished(r)]
  print(
    f'{len(runs)} runs ({len(points)} points x {_SEEDS.value} seeds), {len(runs) - len(pending)} '
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
    with open(path, 'w') as f:
      f.write(slurm_script(pending, workdir, _SBATCH.value))
    print(f'Wrote {path}; submit with: sbatch {path}')
  else:
    with concurrent.futures.ThreadPoolExecutor(_PARALLEL.value) as pool:
      codes = list(pool.map(_run_local, pending))
    failed = [r['workdir'] for r, c in zip(pending, codes) if c != 0 or not finished(r)]
    if failed:  # Failed, or stopped by a signal with a checkpoint (rerun the sweep to resume).
      raise SystemExit(f'{len(failed)} runs did not finish (see output.log in each): {failed}')
    print(f'All {len(runs)} runs finished in {workdir}', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
