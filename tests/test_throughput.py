"""Throughput benchmark, FLOP/MFU accounting and mixed precision (issue 9)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import REPO, tiny_sivt_config

from configs import sivt as sivt_config
from jaxad import evaluate, models, parallel, perf, train
from jaxad.data import pipeline

_TINY_SIVT = (
  '--config.backbone.weights=random',
  '--config.dataset.image_size=32',
  '--config.sivt.feature_size=8',
  '--config.sivt.width=64',
  '--config.sivt.num_heads=4',
  '--config.sivt.encoder_depth=1',
  '--config.sivt.decoder_depth=1',
)


def test_benchmark_script_prints_one_json_line_with_every_field():
  out = subprocess.run(
    [
      sys.executable,
      'benchmarks/throughput.py',
      '--config',
      'configs/sivt.py',
      '--batch',
      '4',
      '--steps',
      '2',
      '--repeats',
      '2',
      '--warmup',
      '1',
      *_TINY_SIVT,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 1, out
  r = json.loads(lines[0])
  assert r['model'] == 'sivt' and r['config'] == 'configs/sivt.py' and r['batch'] == 4
  assert r['platform'] == 'cpu' and r['dtype'] == 'float32'
  assert r['cached_features'] is True  # The default's quarter turns are cached, one feature map per turn.
  for k in ('train_img_per_s', 'infer_img_per_s', 'lower_s', 'xla_compile_s', 'infer_compile_s'):
    assert r[k] > 0, k
  assert r['compile_s'] == pytest.approx(r['lower_s'] + r['xla_compile_s'])
  assert r['train_img_per_s'] == pytest.approx(4e3 / r['train_step_ms'])
  assert r['peak_memory_bytes'] is None or r['peak_memory_bytes'] > 0
  # No CPU peak in the table: no MFU.
  assert r['peak_flops_per_device'] is None and r['train_mfu'] is None and r['infer_mfu'] is None
  # SIVT's analytic count (matmuls only) is what --flops=auto uses, and on CPU, where XLA sees every
  # dot, it must be a little below XLA's count, which adds the elementwise ops and the optimizer.
  assert r['flops_source'] == 'analytic'
  assert r['train_flops_per_step'] == r['train_flops_per_step_analytic']
  for what in ('train', 'infer'):
    ratio = r[f'{what}_flops_per_step_analytic'] / r[f'{what}_flops_per_step_xla']
    assert 0.8 < ratio <= 1.0, (what, ratio)


def test_compile_only_reports_compile_times_and_runs_no_step():
  out = subprocess.run(
    [
      sys.executable,
      'benchmarks/throughput.py',
      '--config',
      'configs/sivt.py',
      '--batch',
      '4',
      '--compile_only',
      *_TINY_SIVT,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout
  r = json.loads(out.strip().splitlines()[-1])
  assert 'train_img_per_s' not in r
  for step in ('', 'score_'):
    for part in ('lower', 'xla_compile'):
      assert r[f'{step}{part}_s'] > 0 and r[f'{step}{part}_cpu_s'] > 0, (step, part)


def test_xla_flops_and_mfu_of_a_matmul():
  m, n, k = 64, 48, 32
  f = jax.jit(lambda a, b: a @ b)
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  flops = perf.xla_flops(f.lower(a, b).compile())
  assert flops == 2 * m * n * k
  seconds = perf.median_seconds(lambda: f(a, b), steps=3, repeats=3)
  assert seconds > 0
  # 1 TFLOP/s peak per device, 2 devices: MFU = FLOPs / time / 2e12.
  assert perf.mfu(flops, seconds, 1e12, num_devices=2) == pytest.approx(flops / seconds / 2e12)
  assert perf.mfu(flops, seconds, None) is None and perf.mfu(None, seconds, 1e12) is None


def test_peak_table_by_device_kind():
  assert perf.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == pytest.approx(989.4e12)
  assert perf.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == pytest.approx(756e12)
  assert perf.peak_flops('NVIDIA H200', 'float32') == pytest.approx(494.7e12)
  assert perf.peak_flops('NVIDIA A100-SXM4-80GB', 'bfloat16') == pytest.approx(312e12)
  assert perf.peak_flops('TPU v5 lite', 'bfloat16') == pytest.approx(197e12)
  assert perf.peak_flops('TPU v5p', 'bfloat16') == pytest.approx(459e12)
  assert perf.peak_flops('TPU v4', 'bfloat16') == pytest.approx(275e12)
  assert perf.peak_flops('cpu', 'float32') is None


def test_sivt_analytic_flops_at_paper_settings():
  """Issue 9: ~73 GFLOP per image per train step; the transformer alone is 3 x 23.6 GFLOP."""
  c = sivt_config.get_config('paper')
  tokens, d = 256, 240
  block = 2 * 12 * d * d + 4 * tokens * d  # projections + MLP, attention
  embed = 2 * 272 * 4 * d + 2 * d * d + 2 * d * 272 * 4  # patch embed, decoder embed, pred
  assert perf.sivt_forward_flops(c) == tokens * ((4 * 12 + 8) * block + embed)
  assert 68e9 < perf.sivt_train_flops(c) < 73e9


def test_compute_dtype():
  assert models.compute_dtype('auto') == (jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16)
  assert models.compute_dtype('bfloat16') == jnp.bfloat16
  with pytest.raises(ValueError, match="'float32', 'bfloat16' or 'auto'"):
    models.compute_dtype('fp16')


@pytest.mark.slow
def test_sivt_bfloat16_keeps_fp32_state_and_scores_like_float32(tiny_dataset, tmp_path):
  """Trained in bfloat16, params and optimizer state stay float32, and scoring the test split in
  bfloat16 gives (nearly) the float32 anomaly maps and the same image ranking."""
  config = tiny_sivt_config(tiny_dataset, **{'dtype': 'bfloat16', 'num_epochs': 4})
  root, mesh = config.dataset.root, parallel.make_mesh()
  cats = pipeline.categories(config, root)
  samples = [s for c in cats for s in pipeline.scan(config, root, c, 'train')]
  model16, state, frozen = train.train(config, str(tmp_path), samples, mesh)
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  test = [s for c in cats for s in pipeline.scan(config, root, c, 'test')]
  s16 = evaluate.score_samples(config, model16, state, frozen, test, mesh)
  config32 = tiny_sivt_config(tiny_dataset, **{'dtype': 'float32'})
  model32 = train.build_model(config32, 1)
  s32 = evaluate.score_samples(config32, model32, state, frozen, test, mesh)
  assert s16['maps'].dtype == np.float32
  diff = np.abs(s16['maps'] - s32['maps']).max()
  assert diff > 0  # bfloat16 really ran.
  corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(s16['maps'], s32['maps'])]
  assert min(corr) > 0.99
  assert scipy.stats.spearmanr(s16['scores'], s32['scores'])[0] > 0.95
