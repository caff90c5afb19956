"""Trivial baseline: per-pixel squared distance to the mean training image (image score = max).

Anything that learns should beat it clearly; docs/models/mean_image.md reports it beside every model.
"""

import jax.numpy as jnp
import ml_collections

from jaxad.models import AnomalyModel, ModelContext, layers

# Config fields of the `mean_image` block that only change scoring: a finished run may be rescored with
# other values (jaxad.provenance).
SCORING_FIELDS = ('smoothing_sigma',)


def build(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> AnomalyModel:
  del ctx  # Nothing to schedule: "training" accumulates the mean image.
  sigma = cfg.smoothing_sigma

  def init(rng, batch, frozen):
    del rng, frozen
    return {'sum': jnp.zeros(batch['image'].shape[1:], jnp.float32), 'count': jnp.zeros((), jnp.float32)}

  def train_step(state, batch, rng, frozen):
    del rng, frozen
    images = batch['image']
    state = {'sum': state['sum'] + images.sum(0), 'count': state['count'] + images.shape[0]}
    return state, {'loss': jnp.mean((images - state['sum'] / state['count']) ** 2)}

  def score(state, batch, frozen):
    del frozen
    mean = state['sum'] / jnp.maximum(state['count'], 1.0)
    maps = layers.gaussian_blur(jnp.sum((batch['image'] - mean) ** 2, axis=-1), sigma)
    return maps, maps.max(axis=(1, 2))

  return AnomalyModel(init=init, train_step=train_step, score=score)
