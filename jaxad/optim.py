"""Optimizers from the config, the gradient-application helper every model uses, the paired GAN update."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax TrainState plus BatchNorm running statistics, for models with BatchNorm layers."""

  batch_stats: dict


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """An optax optimizer `opt.name(learning_rate=schedule, **opt.kwargs)`, after optional global-norm
  clipping and coupled L2 decay (in that order, as torch clips before Adam adds weight_decay * params)."""
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
  l2 = opt.l2_weight_decay
  if l2:
    tx = optax.chain(optax.add_decayed_weights(l2), tx)
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


def paired_gan_update(g_state, d_state, generate, d_loss_fn, g_loss_fn):
  """One discriminator update, then one generator update against the updated discriminator.

  The generator runs forward once: `generate(g_params) -> (outputs, g_updates)`. The discriminator
  step sees its outputs with the gradient stopped, `d_loss_fn(d_params, outputs) -> (loss, (d_updates,
  metrics))`; then `g_loss_fn(g_params, outputs, d_state) -> (loss, metrics)` is differentiated with
  respect to the generator's parameters directly and, through the pullback of that one forward pass,
  through `outputs`. `g_updates` / `d_updates` are TrainState fields to replace after each update
  (e.g. BatchNorm statistics). Returns (g_state, d_state, metrics) with both losses and the
  gradient/parameter norms prefixed 'g_' and 'd_'.
  """
  outputs, pullback, g_updates = jax.vjp(generate, g_state.params, has_aux=True)
  d_grad_fn = jax.value_and_grad(d_loss_fn, has_aux=True)
  (d_loss, (d_updates, d_metrics)), d_grads = d_grad_fn(d_state.params, jax.lax.stop_gradient(outputs))
  d_state, d_norms = apply_gradients(d_state, d_grads, prefix='d_')
  d_state = d_state.replace(**d_updates)

  g_grad_fn = jax.value_and_grad(g_loss_fn, argnums=(0, 1), has_aux=True)
  (g_loss, g_metrics), (g_direct, output_grads) = g_grad_fn(g_state.params, outputs, d_state)
  (g_through,) = pullback(output_grads)
  g_state, g_norms = apply_gradients(g_state, jax.tree.map(jnp.add, g_direct, g_through), prefix='g_')
  g_state = g_state.replace(**g_updates)
  metrics = {'loss': g_loss, **g_metrics, 'd_loss': d_loss, **d_metrics, **g_norms, **d_norms}
  return g_state, d_state, metrics


def tree_size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
