"""Backbone load time and forward throughput.

    python benchmarks/backbones.py                       # every backbone, 256x256, batch 8
    python benchmarks/backbones.py --archs resnet18 tf_efficientnet_lite0 --batch 32 --dtype bfloat16

For each backbone: ``load`` time (with ``weights='imagenet'`` where it resolves offline,
else random init), first-call time (XLA compile + one batch) and steady-state images/s
of the jitted feature extractor (``features`` default 0..3), on jax's default device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxad.models import backbones as B  # noqa: E402
from jaxad.models.backbones import registry  # noqa: E402

DEFAULT_ARCHS = (
  'tf_efficientnet_lite0',
  'tf_efficientnet_lite1',
  'tf_efficientnet_lite2',
  'efficientnet_b0',
  'efficientnet_b4',
  'tf_efficientnet_b4',
  'resnet18',
  'resnet34',
  'resnet50',
  'wide_resnet50_2',
  'vgg16',
  'vgg16_bn',
  'vgg19',
)


def bench(arch: str, batch: int, size: int, iters: int, features, dtype) -> dict:
  try:
    registry.resolve_weights(arch, 'imagenet')
    weights = 'imagenet'
  except FileNotFoundError:
    weights = None
  t0 = time.perf_counter()
  ext = B.load(arch, weights, features=features, dtype=dtype)
  jax.block_until_ready(ext.params)
  load_s = time.perf_counter() - t0

  x = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 3), np.float32))
  t0 = time.perf_counter()
  jax.block_until_ready(ext(x))
  first_s = time.perf_counter() - t0
  jax.block_until_ready(ext(x))  # warm
  t0 = time.perf_counter()
  for _ in range(iters):
    out = ext(x)
  jax.block_until_ready(out)
  dt = (time.perf_counter() - t0) / iters
  return dict(
    arch=arch,
    weights=weights or 'random',
    load_s=round(load_s, 2),
    first_call_s=round(first_s, 2),
    batch_s=round(dt, 4),
    img_per_s=round(batch / dt, 1),
    channels=list(ext.channels),
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--archs', nargs='*', default=list(DEFAULT_ARCHS))
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--size', type=int, default=256)
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--features', type=int, nargs='*', default=[0, 1, 2, 3])
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--json', help='also write the rows to this file')
  a = p.parse_args(argv)
  dtype = jnp.dtype(a.dtype)
  dev = jax.devices()[0]
  print(
    f'device: {dev.device_kind} ({jax.default_backend()}, {os.cpu_count()} CPUs), '
    f'{a.batch}x{a.size}x{a.size}, features {tuple(a.features)}, {a.dtype}'
  )
  print(f'{"arch":24s} {"weights":8s} {"load s":>7s} {"1st call s":>10s} {"batch s":>8s} {"img/s":>8s}')
  rows = []
  for arch in a.archs:
    r = bench(arch, a.batch, a.size, a.iters, tuple(a.features), dtype)
    rows.append(r)
    print(
      f'{r["arch"]:24s} {r["weights"]:8s} {r["load_s"]:7.2f} {r["first_call_s"]:10.2f} '
      f'{r["batch_s"]:8.3f} {r["img_per_s"]:8.1f}',
      flush=True,
    )
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(
        dict(
          device=str(dev.device_kind),
          backend=jax.default_backend(),
          batch=a.batch,
          size=a.size,
          dtype=a.dtype,
          rows=rows,
        ),
        f,
        indent=1,
      )
  return 0


if __name__ == '__main__':
  sys.exit(main())
