"""Anomaly-detection models. Each lives in `jaxad/models/<config.model.name>.py` and exposes `build`.

A model module defines `build(config, total_steps) -> AnomalyModel` (total_steps sizes LR schedules). The harness (jaxad/train.py, jaxad/evaluate.py)
drives every model through the same few pure functions, which it jits and shards:

  frozen                                   pytree of constants (e.g. frozen backbone weights), replicated
  init(rng, batch, frozen) -> state        model state: a TrainState, or a dict of them for GANs
  train_step(state, batch, rng, frozen) -> (state, metrics)
                                           with `config.phases`, also a `phase=<name>` keyword (static)
  score(state, batch, frozen) -> (maps [B, H, W], image_scores [B])
  precompute(batch, frozen) -> dict        optional: per-image arrays that depend only on frozen weights;
                                           the harness may compute them once for the training set
                                           (`cached_keys`) and feed them in place of recomputing.
  prepare(source) -> dict                  optional: arrays chosen from the training source (e.g. RB-AE's
                                           reference image), added to the example batch `init` sees.

`batch` is a dict of arrays: 'image' float32 [B, H, W, C] in [0, 1] (always present at test time),
'label' int32 [B] and 'mask' uint8 [B, H, W] at test time, and any cached `precompute` outputs.
"""

import dataclasses
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class AnomalyModel:
  init: Callable[..., Any]
  train_step: Callable[..., Any]
  score: Callable[..., Any]
  frozen: Any = dataclasses.field(default_factory=dict)
  precompute: Callable[..., Any] | None = None
  cached_keys: tuple[str, ...] = ()
  prepare: Callable[..., Any] | None = None


def build(config: ml_collections.ConfigDict, total_steps: int) -> AnomalyModel:
  """Imports `jaxad.models.<config.model.name>` and calls its `build(config, total_steps)`."""
  name = config.model.name
  try:
    module = importlib.import_module(f'jaxad.models.{name}')
  except ModuleNotFoundError as e:
    if e.name != f'jaxad.models.{name}':
      raise
    raise ValueError(f'No model {name!r}: expected a module jaxad/models/{name}.py') from e
  return module.build(config, total_steps)


def compute_dtype(name: str) -> jnp.dtype:
  """`config.dtype` as a dtype: 'float32', 'bfloat16', or 'auto' = bfloat16 on GPU/TPU, float32 on CPU.

  The activation/matmul dtype only: Flax params (and so optimizer state) stay float32, and models
  return losses and scores in float32.
  """
  if name == 'auto':
    return jnp.dtype(jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16)
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype must be 'float32', 'bfloat16' or 'auto', got {name!r}")
  return jnp.dtype(name)


def load_backbone(cfg: ml_collections.ConfigDict, dtype: jnp.dtype = jnp.float32):
  """The frozen CNN a config's `backbone` block names, computing in `dtype` (maps come back float32).

  cfg.weights: 'imagenet' (resolved offline), a ported weights file, or 'random' (tests only).
  """
  from jaxad.models import backbones

  if not cfg.weights:
    raise FileNotFoundError(
      f'backbone.weights is empty: {cfg.arch} needs ImageNet weights. Port a timm checkpoint with '
      f'`python -m jaxad.port --arch {cfg.arch} --checkpoint FILE --out FILE` and pass '
      f'--config.backbone.weights=FILE (or "imagenet" where an offline package provides them).'
    )
  weights = None if cfg.weights == 'random' else cfg.weights
  return backbones.load(cfg.arch, weights=weights, features=tuple(cfg.features), dtype=dtype)
