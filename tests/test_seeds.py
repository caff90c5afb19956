"""config.num_seeds: replica k of a K-seed run equals the single run of seed k; K-seed runs resume exactly."""

import csv
import json

import jax
import ml_collections
import numpy as np
import pytest
from conftest import override, tiny_folder_config, tiny_sivt_config

from jaxad import parallel, train, writers
from jaxad.data import folder, pipeline


def _sgd(config):
  """Plain SGD: the vmapped backward differs from the single one in the last float bits (reassociation);
  Adam's normalisation turns such differences in near-zero gradients into learning-rate-sized steps,
  SGD keeps them at float precision (docs/performance.md, "Seeds in one program")."""
  config.optimizer.name = 'sgd'
  config.optimizer.kwargs = ml_collections.ConfigDict({})
  return config


def _one_category(config):
  config.dataset.categories = folder.resolve_categories(config.dataset.root, 'all')[0]
  return config


def _samples(config):
  root = config.dataset.root
  categories = folder.resolve_categories(root, config.dataset.categories)
  return [s for c in categories for s in pipeline.scan(config, root, c, 'train')]


def _losses(path):
  return [(r['step'], r['train/loss']) for r in map(json.loads, open(path)) if 'train/loss' in r]


def _max_difference(a, b) -> float:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
    for x, y in zip(leaves_a, leaves_b)
  )


def _assert_same_record(ours, theirs, where: str = '') -> None:
  """Equal JSON records, floats to 1e-4 relative (replicas round differently from single runs, so
  a metric that averages many pixels can move in its last digits)."""
  if isinstance(theirs, dict):
    assert isinstance(ours, dict) and sorted(ours) == sorted(theirs), where
    for k in theirs:
      _assert_same_record(ours[k], theirs[k], f'{where}.{k}')
  elif isinstance(theirs, list):
    assert isinstance(ours, list) and len(ours) == len(theirs), where
    for i, (a, b) in enumerate(zip(ours, theirs)):
      _assert_same_record(a, b, f'{where}[{i}]')
  elif isinstance(theirs, float):
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6), where
  else:
    assert ours == theirs, where


def _replicas_equal_single_runs(config, tmp_path, steps: int, tolerance: float) -> list[float]:
  """Trains `config` with num_seeds=2 and seeds 0 and 1 alone for `steps` steps; checks replica k
  against seed k (state within `tolerance`, 0 = bitwise; every logged loss to 1e-6 relative: the
  vmapped mean reduces in another order)."""
  mesh = parallel.make_mesh()
  samples = _samples(config)
  both = override(config.copy_and_resolve_references(), num_seeds=2)
  _, stacked, _ = train.train(both, str(tmp_path / 'k2'), samples, mesh, stop_after=steps)
  differences = []
  for seed in (0, 1):
    single = override(config.copy_and_resolve_references(), seed=seed)
    _, alone, _ = train.train(single, str(tmp_path / f'seed{seed}'), samples, mesh, stop_after=steps)
    replica = train.replica_state(stacked, seed)
    differences.append(_max_difference(replica, alone))
    assert differences[-1] <= tolerance, (seed, differences)
    ours, theirs = (
      _losses(d / 'log.jsonl') for d in (tmp_path / 'k2' / f'seed_{seed}', tmp_path / f'seed{seed}')
    )
    assert [s for s, _ in ours] == [s for s, _ in theirs] and len(ours) == steps
    np.testing.assert_allclose([l for _, l in ours], [l for _, l in theirs], rtol=1e-6)
  # The seed matters: the two replicas are different models.
  assert _max_difference(train.replica_state(stacked, 0), train.replica_state(stacked, 1)) > 1e-3
  return differences


def test_mean_image_replicas_are_bitwise_the_single_runs(tiny_dataset, tmp_path):
  from configs import mean_image

  config = tiny_folder_config(mean_image.get_config(), tiny_dataset)
  config.num_epochs, config.log_every = 7, 1  # 21 steps of 8 of the 24 images.
  _replicas_equal_single_runs(config, tmp_path, steps=20, tolerance=0)


@pytest.mark.slow  # About a minute: three runs of 20 steps and two compiles.
def test_sivt_replicas_equal_the_single_runs(tiny_dataset, tmp_path):
  config = _sgd(_one_category(tiny_sivt_config(tiny_dataset, num_epochs=7, batch_size=4, log_every=1)))
  _replicas_equal_single_runs(config, tmp_path, steps=20, tolerance=1e-5)


@pytest.mark.slow  # Compiles the GAN step twice (vmapped and alone).
def test_mask_vitgan_replicas_equal_the_single_runs(tiny_dataset, tmp_path):
  from test_mask_vitgan import tiny_config

  config = _sgd(_one_category(tiny_config(tiny_dataset, num_epochs=7, batch_size=4)))
  # At the default's 2e-3 the adversarial game grows rounding differences to 1.5e-3 relative in the
  # losses after 20 steps; at 1e-4 replica and single run stay 1.2e-7 apart.
  config.optimizer.learning_rate = 1e-4
  _replicas_equal_single_runs(config, tmp_path, steps=20, tolerance=1e-5)


@pytest.mark.slow  # Compiles both RB-AE phases twice (vmapped and alone).
def test_two_phase_rbae_replicas_equal_the_single_runs(tiny_dataset, tmp_path):
  from test_rbae import _tiny_config

  config = _sgd(_one_category(_tiny_config(tiny_dataset)))
  config.phases, config.num_epochs = (('reconstruct', 4), ('repair', 3)), 7  # 21 steps of 4 of 12 images.
  # SGD at RB-AE's 1e-3 on its loss (w_rec1 = 100) grows a rounding difference (7.7e-8 relative in the
  # second step's loss) about tenfold per step, to 1.4e-3 on the parameters after 20 steps. At 1e-5 the
  # steps are small enough for the check to see the program, not the dynamics (1.8e-7 measured).
  config.optimizer.learning_rate = 1e-5
  _replicas_equal_single_runs(config, tmp_path, steps=20, tolerance=1e-5)


def test_seed_folders_hold_the_single_runs_outputs(tiny_dataset, tmp_path):
  """train_and_evaluate with num_seeds=2 (each seed its own calibration hold-out): every seed_<s>/ has
  the metrics, heatmaps and calibration of the single run of seed s (to float rounding)."""
  config = _sgd(tiny_sivt_config(tiny_dataset, num_epochs=2, **{'calibration.holdout': 0.25}))
  both = train.train_and_evaluate(
    override(config.copy_and_resolve_references(), num_seeds=2), str(tmp_path / 'k2')
  )
  for seed in (0, 1):
    alone = train.train_and_evaluate(
      override(config.copy_and_resolve_references(), seed=seed), str(tmp_path / f's{seed}')
    )
    ours, theirs = tmp_path / 'k2' / f'seed_{seed}', tmp_path / f's{seed}'
    m_ours, m_theirs = (json.loads((d / 'metrics.json').read_text()) for d in (ours, theirs))
    assert m_ours['provenance']['seed'] == seed
    for key in ('categories', 'mean', 'calibration'):
      _assert_same_record(m_ours[key], m_theirs[key], key)
    _assert_same_record(writers.json_safe(both[seed]), writers.json_safe(alone), 'result')
    assert (ours / 'results.md').is_file()
    heatmaps = sorted(p.relative_to(ours) for p in (ours / 'heatmaps').rglob('*.png'))
    assert heatmaps and heatmaps == sorted(
      p.relative_to(theirs) for p in (theirs / 'heatmaps').rglob('*.png')
    )
    for path in (theirs / 'calibration').iterdir():
      if path.suffix == '.json':
        _assert_same_record(
          *(json.loads((d / 'calibration' / path.name).read_text()) for d in (ours, theirs))
        )
      else:
        with np.load(ours / 'calibration' / path.name) as a, np.load(path) as b:
          assert sorted(a) == sorted(b)
          for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
  assert (
    m_ours['categories']
    != json.loads((tmp_path / 'k2' / 'seed_0' / 'metrics.json').read_text())['categories']
  )
  assert not (tmp_path / 'k2' / 'metrics.json').exists() and (tmp_path / 'k2' / 'checkpoints').is_dir()


def test_stopped_and_resumed_seeds_equal_an_uninterrupted_run(tiny_dataset, tmp_path):
  """A 2-seed run stopped after step 4 (with a checkpoint, as a preempted run) and resumed is bitwise the
  uninterrupted one: state, and every replica's losses (which depend on each replica's batch order)."""
  from configs import mean_image

  config = tiny_folder_config(mean_image.get_config(), tiny_dataset)
  config.num_epochs, config.log_every, config.num_seeds = 3, 1, 2  # 9 steps.
  mesh = parallel.make_mesh()
  _, full, _ = train.train(config, str(tmp_path / 'full'), _samples(config), mesh)
  train.train(config, str(tmp_path / 'resumed'), _samples(config), mesh, stop_after=4)
  assert sorted(p.name for p in (tmp_path / 'resumed' / 'checkpoints').iterdir() if p.name.isdigit()) == ['4']
  _, resumed, _ = train.train(config, str(tmp_path / 'resumed'), _samples(config), mesh)
  assert _max_difference(full, resumed) == 0
  for seed in (0, 1):
    logs = [_losses(tmp_path / d / f'seed_{seed}' / 'log.jsonl') for d in ('full', 'resumed')]
    assert logs[0] == logs[1] and len(logs[0]) == 9
  assert logs[0] != _losses(tmp_path / 'full' / 'seed_0' / 'log.jsonl')


def test_vmap_seeds_plans_one_run_per_point_with_every_seed_folder():
  from jaxad import sweep

  runs = sweep.plan('configs/x.py', [{'a': 1}, {'a': 2}], 3, 'sw', {}, vmap_seeds=True)
  assert [r['workdir'] for r in runs] == ['sw/a=1', 'sw/a=2']
  assert runs[0]['outputs'] == ['sw/a=1/seed_0', 'sw/a=1/seed_1', 'sw/a=1/seed_2']
  assert runs[0]['seeds'] == [0, 1, 2]
  assert runs[0]['args'][-3:] == ['--config.a=1', '--config.seed=0', '--config.num_seeds=3']


_FLIP_SWEEP = """
from jaxad.sweep import grid


def get_sweep(arg=None):
  return grid({'augment.hflip': [False, True]})
"""


@pytest.mark.slow  # Six jaxad.main processes.
def test_vmap_seeds_sweep_equals_the_sweep_of_single_runs(tiny_dataset, tmp_path):
  """`jaxad.sweep --vmap_seeds`: one process per point, the same seed_<s>/metrics.json as one process per
  seed (mean_image with seeded flips: the seeds differ), and jaxad.report reads them."""
  import subprocess
  import sys

  from conftest import REPO
  from test_sweep import _sweep_cmd

  sweep_file = tmp_path / 'grid.py'
  sweep_file.write_text(_FLIP_SWEEP)
  for name, extra in (('single', ()), ('vmapped', ('--vmap_seeds',))):
    cmd = _sweep_cmd(sweep_file, tmp_path / name, tiny_dataset, *extra)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
  assert '2 runs (2 points x 2 seeds, the seeds of a point in one run)' in done.stderr
  # mean_image trains one model per category: the replicas' checkpoints are in the category's folder.
  point = tmp_path / 'vmapped' / 'augment.hflip=True'
  assert sorted(p.name for p in point.iterdir() if p.is_dir()) == ['seed_0', 'seed_1', 'weave']
  assert (point / 'weave' / 'checkpoints').is_dir() and not (point / 'seed_0' / 'checkpoints').exists()
  means = {}
  for name in ('single', 'vmapped'):
    for path in sorted((tmp_path / name).glob('*/seed_*/metrics.json')):
      means.setdefault(path.relative_to(tmp_path / name), []).append(json.loads(path.read_text())['mean'])
  assert len(means) == 4 and all(a == b for a, b in means.values())
  flipped = [means[p][0] for p in sorted(means) if 'True' in str(p)]
  assert flipped[0] != flipped[1]  # Each seed flips other images.
  report = subprocess.run(
    [sys.executable, '-m', 'jaxad.report', str(tmp_path / 'vmapped')],
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert report.returncode == 0, report.stderr[-3000:]
  with open(tmp_path / 'vmapped' / 'report.csv') as f:
    assert [row['num_seeds'] for row in csv.DictReader(f)] == ['2', '2']
