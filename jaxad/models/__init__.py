"""Anomaly-detection models. Each lives in `jaxad/models/<config.model.name>.py` and exposes `build`.

A model module defines `build(cfg, ctx) -> AnomalyModel`: `cfg` is the model's own config block
(`config.<model name>`), `ctx` the `ModelContext` the harness hands it (input shape, compute dtype,
optimizer, step counts, frozen backbone). A model reads nothing else of the config. The harness
(jaxad/train.py, jaxad/evaluate.py) drives every model through the same few pure functions, which it
jits and shards:

  frozen                                   pytree of constants (e.g. frozen backbone weights), replicated
  init(rng, batch, frozen) -> state        model state: a TrainState, or a dict of them for GANs
  train_step(state, batch, rng, frozen) -> (state, metrics)
                                           with `config.phases`, also a `phase=<name>` keyword (static)
  score(state, batch, frozen) -> (maps [B, H, W], image_scores [B])
  precompute(batch, frozen) -> dict        optional: per-image arrays that depend only on frozen weights;
                                           the harness may compute them once for the training set
                                           (`cached_keys`, with `backbone.cache_features`) and feed
                                           them in place of recomputing.
  prepare(source) -> dict                  optional: arrays chosen from the training source (e.g. RB-AE's
                                           reference image), added to the example batch `init` sees.
  reference(state, batch, frozen) -> dict  optional: per-image statistics {name: [B, ...]} of normal
                                           images that `score` compares against (Mask-ViT-GAN: the
                                           mean error of each mask scale, Eq. 8's mu_i). After
                                           training, the harness averages them over each category's
                                           training images (jaxad.evaluate.fit_reference), keeps the
                                           means in that category's calibration (jaxad.calibration,
                                           so a unified model still has one reference per category)
                                           and scores with `with_reference(state, means)`. A model
                                           with `reference` has a dict state, and its `score` reads
                                           state['reference'].

`batch` is a dict of arrays: 'image' float32 [B, H, W, C] in [0, 1] (always present at test time),
'label' int32 [B] and 'mask' uint8 [B, H, W] at test time, and any cached `precompute` outputs.
"""

import dataclasses
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxad import optim


@dataclasses.dataclass(frozen=True)
class AnomalyModel:
  init: Callable[..., Any]
  train_step: Callable[..., Any]
  score: Callable[..., Any]
  frozen: Any = dataclasses.field(default_factory=dict)
  precompute: Callable[..., Any] | None = None
  cached_keys: tuple[str, ...] = ()
  prepare: Callable[..., Any] | None = None
  reference: Callable[..., Any] | None = None


def with_reference(state: dict, reference: dict) -> dict:
  """The model state `score` sees for one category: `state` plus state['reference'] (`reference` hook)."""
  return {**state, 'reference': {k: np.asarray(v, np.float32) for k, v in reference.items()}}


@dataclasses.dataclass(frozen=True)
class ModelContext:
  """What the harness hands a model besides its own config block."""

  image_size: int  # Input images are [B, image_size, image_size, channels].
  channels: int
  dtype: jnp.dtype  # Activation/matmul dtype (params, losses and scores stay float32).
  attention_implementation: str | None  # For jax.nn.dot_product_attention (layers.Attention).
  total_steps: int  # Training steps of the whole run.
  phase_steps: dict[str, int]  # Steps of each training phase, in order ({} without config.phases).
  optimizer_config: ml_collections.ConfigDict  # config.optimizer.
  backbone: Any = None  # The frozen backbones.Backbone config.backbone names, or None.

  def make_optimizer(self, steps: int | None = None) -> optax.GradientTransformation:
    """The configured optimizer, its schedule spanning `steps` (default: the whole run)."""
    return optim.make_optimizer(self.optimizer_config, self.total_steps if steps is None else steps)


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


def build(name: str, cfg: ml_collections.ConfigDict, ctx: ModelContext) -> AnomalyModel:
  """Imports `jaxad.models.<name>` and calls its `build(cfg, ctx)`."""
  try:
    module = importlib.import_module(f'jaxad.models.{name}')
  except ModuleNotFoundError as e:
    if e.name != f'jaxad.models.{name}':
      raise
    raise ValueError(f'No model {name!r}: expected a module jaxad/models/{name}.py') from e
  return module.build(cfg, ctx)
