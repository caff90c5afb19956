"""Throughput measurement: step timing, XLA/analytic FLOPs, peak FLOP/s per device and MFU."""

import statistics
import time
from typing import Any, Callable

import jax
import ml_collections

from jaxad.models import backbones

# Dense (no sparsity) peak FLOP/s per device, by compute dtype. 'float32' is what XLA runs float32
# matmuls at under JAX's default precision: TF32 tensor cores on NVIDIA Ampere/Hopper, one bf16 pass on
# TPUs. Sources: NVIDIA H100 datasheet (SXM: 989.4 TF bf16, 494.7 TF tf32; PCIe: 756 / 378), NVIDIA
# H200 datasheet (SXM: 989 / 494, the H100 SXM's compute), NVIDIA A100 datasheet (312 / 156),
# Google Cloud TPU system architecture pages (per chip bf16: v4 275 TF, v5e 197 TF, v5p 459 TF).
_PEAK_TFLOPS = (  # (lower-case substring of device_kind, {dtype: TFLOP/s}); first match wins.
  ('h100 pcie', {'bfloat16': 756.0, 'float32': 378.0}),
  ('h100', {'bfloat16': 989.4, 'float32': 494.7}),
  ('h200', {'bfloat16': 989.4, 'float32': 494.7}),
  ('a100', {'bfloat16': 312.0, 'float32': 156.0}),
  ('tpu v4', {'bfloat16': 275.0, 'float32': 275.0}),
  ('tpu v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),
  ('tpu v5e', {'bfloat16': 197.0, 'float32': 197.0}),
  ('tpu v5', {'bfloat16': 459.0, 'float32': 459.0}),  # v5p reports 'TPU v5' (or 'TPU v5p').
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device of this kind for matmuls in `dtype`; None when unknown (e.g. CPUs)."""
  kind = device_kind.lower()
  for key, peaks in _PEAK_TFLOPS:
    if key in kind:
      return peaks[dtype] * 1e12
  return None


def xla_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled function by XLA's cost analysis (blind inside custom calls)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def mfu(
  flops_per_step: float | None, step_seconds: float, peak_per_device: float | None, num_devices: int = 1
) -> float | None:
  """Model FLOPs utilisation: (FLOPs per step / step time) / (peak FLOP/s of all devices)."""
  if not flops_per_step or not peak_per_device:
    return None
  return flops_per_step / step_seconds / (peak_per_device * num_devices)


def median_seconds(run: Callable[[], Any], steps: int, repeats: int) -> float:
  """Median over `repeats` of the seconds per call of `steps` back-to-back calls of `run`.

  `run()` returns arrays; the last call's are waited on (block_until_ready) before the clock stops.
  Warm up (compile) before calling this.
  """
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = run()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / steps)
  return statistics.median(times)


def sivt_forward_flops(config: ml_collections.ConfigDict) -> float:
  """Matmul FLOPs of one SIVT transformer forward pass (Algorithm 1) for one image.

  L = (feature_size / P)^2 tokens of width D; the encoder runs on the N sequences Phi_i (Eq. 1), the
  decoder on one. Per token and block: 4 D x D projections (q, k, v, out) and the MLP (2 D x rD)
  = 2 (4 + 2r) D^2, plus attention scores and values 2 * 2 L D. Plus the patch embedding (P^2 C -> D),
  decoder embedding (D -> D) and prediction (D -> P^2 C). LayerNorm, GELU, softmax and the
  frozen backbone are not counted (the backbone is not part of a step that reads cached features).
  """
  s = config.sivt
  d, p, r = s.width, s.patch_size, s.mlp_ratio
  tokens = (s.feature_size // p) ** 2
  c = sum(backbones.arch_info(config.backbone.arch).channels[i] for i in config.backbone.features)
  per_token_block = 2 * (4 + 2 * r) * d * d + 4 * tokens * d
  blocks = s.num_subsets * s.encoder_depth + s.decoder_depth
  per_token = blocks * per_token_block + 2 * p * p * c * d + 2 * d * d + 2 * d * p * p * c
  return float(tokens * per_token)


def sivt_train_flops(config: ml_collections.ConfigDict) -> float:
  """Analytic FLOPs of one SIVT train step per image: forward + backward = 3 x forward.

  At configs/sivt.py:paper (L = 256, D = 240, N = 4, 12 + 8 blocks, C = 272) this is 70.9 GFLOP, the
  ~73 GFLOP per image of issue 9 less the backbone, which a step on cached features does not run.
  """
  return 3.0 * sivt_forward_flops(config)


def sivt_score_flops(config: ml_collections.ConfigDict) -> float:
  """Analytic transformer FLOPs of SIVT's score per image: one forward per fixed test partition."""
  return config.sivt.test_partitions * sivt_forward_flops(config)
