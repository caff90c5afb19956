"""Optimizers from the config, and the one gradient-application helper every model uses."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax TrainState plus BatchNorm running statistics, for models with BatchNorm layers."""

  batch_stats: dict


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """An optax optimizer `opt.name(learning_rate=schedule, **opt.kwargs)` with optional clipping."""
  peak = opt.learning_rate
  warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
  if opt.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  elif opt.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  else:
    raise ValueError(f'Unknown schedule {opt.schedule!r}; expected "constant" or "cosine".')
  schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
  try:
    factory = getattr(optax, opt.name)
  except AttributeError:
    raise ValueError(f'Unknown optax optimizer {opt.name!r}.') from None
  tx = factory(learning_rate=schedule, **opt.get('kwargs', {}))
  if opt.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx


def apply_gradients(state: train_state.TrainState, grads, prefix: str = ''):
  """`state.apply_gradients` plus the gradient and parameter global norms for the log."""
  new_state = state.apply_gradients(grads=grads)
  norms = {
    f'{prefix}grad_norm': optax.tree.norm(grads),
    f'{prefix}param_norm': optax.tree.norm(new_state.params),
  }
  return new_state, norms


def mean_metrics(metrics: dict) -> dict:
  """Casts metric values to float32 scalars (the harness averages them over steps)."""
  return {k: jnp.asarray(v, jnp.float32).mean() for k, v in metrics.items()}


def tree_size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
