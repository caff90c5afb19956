"""Optimizer pieces: coupled L2 decay and the paired D-then-G GAN update against updates written out by
hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import rbae as rbae_config
from jaxad import optim


def _adam_by_hand(params, grads, lr, decay, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam with weight_decay: the gradient plus decay * params feeds both moments (float64)."""
  w, m, v = np.asarray(params, np.float64), 0.0, 0.0
  for t, g in enumerate(grads, 1):
    g = np.asarray(g, np.float64) + decay * w
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return w


def test_paper_optimizer_is_adam_with_coupled_l2_decay():
  """configs/rbae.py:paper (Adam 1e-4, weight decay 1e-5) over two steps against the hand computation.
  The first parameter has no loss gradient: coupled decay moves it by ~lr (Adam normalises the decay
  term), AdamW's decoupled decay by lr * 1e-5 * w."""
  opt = rbae_config.get_config('paper').optimizer
  tx = optim.make_optimizer(opt, total_steps=10)
  params = jnp.asarray([1.0, -2.0, 3.0], jnp.float32)
  grads = [np.asarray([0.0, 0.3, -2e-5], np.float32), np.asarray([0.0, -0.1, 4e-5], np.float32)]
  state, w = tx.init(params), params
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, w)
    w = optax.apply_updates(w, updates)
  expected = _adam_by_hand(params, grads, lr=1e-4, decay=1e-5)
  np.testing.assert_allclose(np.asarray(w), expected, rtol=0, atol=5e-7)  # float32 ulp at 3: 2.4e-7
  assert float(params[0] - w[0]) > 1.9e-4  # two steps of ~lr each
  adamw = optax.adamw(1e-4, weight_decay=1e-5)
  state, w_adamw = adamw.init(params), params
  for g in grads:
    updates, state = adamw.update(jnp.asarray(g), state, w_adamw)
    w_adamw = optax.apply_updates(w_adamw, updates)
  assert abs(float(params[0] - w_adamw[0])) < 1e-8


def _problem():
  """A generator with a direct and an indirect path into its loss, a linear critic, BatchNorm-like fields."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  g_params = {
    'w': jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
    'e': jnp.asarray(rng.normal(size=(3,)), jnp.float32),
  }
  d_params = {'v': jnp.asarray(rng.normal(size=(3,)), jnp.float32)}

  def generate(p):
    out = jnp.tanh(x @ p['w'])
    return out, {'batch_stats': {'mean': out.mean(0)}}

  def d_loss_fn(p, fake):
    loss = jnp.mean(jnp.square(fake @ p['v'])) - jnp.mean(x @ p['v'])
    return loss, ({'batch_stats': {'mean': fake.mean(0) + 1.0}}, {'d_fake': jnp.mean(fake @ p['v'])})

  def g_loss_fn(p, out, d_state):
    adv = jnp.mean(jnp.square(out @ d_state.params['v'] - 1.0))
    direct = jnp.sum(jnp.square(p['e']) * out.mean(0))  # Depends on p directly and through `out`.
    return adv + direct, {'adv': adv}

  def state(params):
    stats = {'mean': jnp.zeros(3)}
    return optim.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1), batch_stats=stats)

  return state(g_params), state(d_params), generate, d_loss_fn, g_loss_fn


def test_paired_gan_update_is_d_first_then_g_against_the_updated_d():
  g_state, d_state, generate, d_loss_fn, g_loss_fn = _problem()
  new_g, new_d, metrics = jax.jit(optim.paired_gan_update, static_argnums=(2, 3, 4))(
    g_state, d_state, generate, d_loss_fn, g_loss_fn
  )

  fake = generate(g_state.params)[0]
  d_grads = jax.grad(lambda p: d_loss_fn(p, fake)[0])(d_state.params)
  want_d = jax.tree.map(lambda p, g: p - 0.1 * g, d_state.params, d_grads)
  updated_d = d_state.replace(params=want_d)
  g_total = lambda p: g_loss_fn(p, generate(p)[0], updated_d)[0]
  want_g = jax.tree.map(lambda p, g: p - 0.1 * g, g_state.params, jax.grad(g_total)(g_state.params))

  for got, want in ((new_d.params, want_d), (new_g.params, want_g)):
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
  assert int(new_g.step) == int(new_d.step) == 1
  # Each network's returned fields replace its state's after its update.
  np.testing.assert_allclose(new_g.batch_stats['mean'], fake.mean(0), rtol=1e-6)
  np.testing.assert_allclose(new_d.batch_stats['mean'], fake.mean(0) + 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], g_total(g_state.params), rtol=1e-6)
  np.testing.assert_allclose(metrics['d_loss'], d_loss_fn(d_state.params, fake)[0], rtol=1e-6)
  np.testing.assert_allclose(metrics['d_grad_norm'], optax.tree.norm(d_grads), rtol=1e-6)
  assert {'adv', 'd_fake', 'g_grad_norm', 'g_param_norm', 'd_param_norm'} <= set(metrics)


def test_the_discriminator_step_does_not_see_the_generator_loss():
  g_state, d_state, generate, d_loss_fn, g_loss_fn = _problem()
  _, d_a, _ = optim.paired_gan_update(g_state, d_state, generate, d_loss_fn, g_loss_fn)
  doubled = lambda p, out, d: jax.tree.map(lambda v: 2.0 * v, g_loss_fn(p, out, d))
  g_b, d_b, _ = optim.paired_gan_update(g_state, d_state, generate, d_loss_fn, doubled)
  np.testing.assert_array_equal(d_a.params['v'], d_b.params['v'])
  assert not np.allclose(g_b.params['w'], g_state.params['w'])
