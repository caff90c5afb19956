"""Multi-process training on one machine: 2 processes x 2 host devices (gloo) vs 1 process x 4 devices."""

import json
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO

# One jaxad run (train_and_evaluate, then a restore through train.train), as each process executes it;
# dumps this process's copy of the final state.
_RUN = textwrap.dedent("""
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count={devices}'
    sys.path[:0] = [{tests!r}, {repo!r}]
    import jax, numpy as np
    if {num_processes} > 1:
      jax.distributed.initialize('127.0.0.1:{port}', {num_processes}, int(sys.argv[1]))
    assert jax.device_count() == 4 and jax.local_device_count() == {devices}
    from jaxad import parallel, train
    from jaxad.data import pipeline
    from test_vit_memae import tiny_vit_memae_config
    # Smooth in the data: plain SGD (Adam's first steps, ~lr * sign(g), flip on near-zero gradients) and
    # no hard shrinkage of the memory weights (a threshold), so reduction-order differences stay small.
    config = tiny_vit_memae_config({root!r}, num_epochs=2, num_heatmaps=2, **{{
        'dataset.categories': {category!r}, 'dataset.image_size': 32, 'optimizer.name': 'sgd',
        'optimizer.learning_rate': 0.05, 'optimizer.warmup_steps': 0, 'optimizer.schedule': 'constant',
        'vit_memae.shrink_scale': 0.0}})
    train.train_and_evaluate(config, {work!r})
    # A second call restores the finished run's checkpoint on every process and trains no further.
    samples = pipeline.scan(config, {root!r}, {category!r}, 'train')
    _, state, _ = train.train(config, {work!r} + '/' + {category!r}, samples, parallel.make_mesh())
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state)]
    np.savez({work!r} + f'/state_{{jax.process_index()}}.npz', *leaves)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run(root, category, work: pathlib.Path, num_processes: int) -> list[dict]:
  script = _RUN.format(
    devices=4 // num_processes,
    tests=str(REPO / 'tests'),
    repo=str(REPO),
    num_processes=num_processes,
    port=_free_port(),
    root=root,
    category=category,
    work=str(work),
  )
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', script, str(i)],
      cwd=REPO,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(num_processes)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return [dict(np.load(work / f'state_{i}.npz')) for i in range(num_processes)]


@pytest.mark.slow  # minutes: three processes compiling the model.
def test_two_processes_agree_and_match_one_process_with_four_devices(tiny_dataset, tmp_path):
  from jaxad.data import folder

  category = folder.list_categories(tiny_dataset)[0]
  two = _run(tiny_dataset, category, tmp_path / 'two', 2)
  (one,) = _run(tiny_dataset, category, tmp_path / 'one', 1)
  assert len(two[0]) == len(one) > 10
  for k in one:  # The processes hold bitwise-identical replicas.
    np.testing.assert_array_equal(two[0][k], two[1][k])
  # Same global batches (grain gives process i rows i::2 of each), different reduction order: equal
  # up to float32 rounding grown over 3 steps, which reaches ~1e-5 absolute in the decoder's
  # transposed-conv kernels (scale ~0.1-0.2, so ~1e-4 relative): hence rtol 1e-4, atol 5e-5.
  assert int(two[0]['arr_0']) == int(one['arr_0']) == 3  # RunState.step: 12 images x 2 epochs / 8.
  for k in one:
    np.testing.assert_allclose(two[0][k], one[k], rtol=1e-4, atol=5e-5, err_msg=k)

  run = tmp_path / 'two' / category
  logged = [json.loads(line)['step'] for line in (run / 'log.jsonl').read_text().splitlines()]
  assert logged == sorted(set(logged)) == [1, 2, 3]  # Process 0 alone writes the log.
  assert len(list((run / 'heatmaps' / category).glob('*.png'))) == 2
  metrics = [json.loads((tmp_path / d / 'metrics.json').read_text())['mean'] for d in ('two', 'one')]
  assert metrics[0].keys() == metrics[1].keys()
  for k in metrics[0]:  # Maps gathered from both processes score like the single-process run.
    np.testing.assert_allclose(metrics[0][k], metrics[1][k], atol=1e-4, err_msg=k)
