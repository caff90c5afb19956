"""Train-step time with ToMe r=2 vs r=0 in the Mask-ViT-GAN discriminator (the paper's Table 10).

  python benchmarks/tome_speed.py                       # default config, discriminator step and full step
  python benchmarks/tome_speed.py --variant paper --image-size 256 --batch 8 --steps 5

Times (median of --steps runs after one compile-and-warm-up call) of
  disc:  the discriminator's value_and_grad + AdamW update on [real; 2 reconstructions] (3B images);
  full:  the whole jitted GAN `train_step` (generator forward/backward, D then G updates).
Prints one JSON object: per r the step times and the discriminator's token counts per block.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from configs import mask_vitgan as mvg_config
from jaxad import models
from jaxad.models import mask_vitgan, tome


def _time(fn, *args, steps):
  jax.block_until_ready(fn(*args))  # Compile + warm up.
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--variant', default='', help="'' (default config) or 'paper'")
  ap.add_argument('--image-size', type=int, default=0, help='override dataset.image_size')
  ap.add_argument('--batch', type=int, default=0, help='override batch_size')
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--r', type=int, nargs='+', default=[0, 2])
  ap.add_argument('--no-full', action='store_true', help='time only the discriminator step')
  args = ap.parse_args()

  out = {'device': str(jax.devices()[0]), 'variant': args.variant or 'default', 'results': {}}
  for r in args.r:
    c = mvg_config.get_config(args.variant or None)
    if args.image_size:
      c.dataset.image_size = args.image_size
    if args.batch:
      c.batch_size = args.batch
    c.mvg.tome_r = r
    b, s = c.batch_size, c.dataset.image_size
    real = jax.random.uniform(jax.random.key(0), (b, s, s, c.dataset.channels))
    images = jnp.concatenate([real, real, real])  # D sees the reals and both reconstructions.
    cfg = c.mvg
    disc = mask_vitgan.ToMeDiscriminator(cfg.disc_patch_size, cfg.disc_width, cfg.disc_depth,
                                         cfg.disc_num_heads, cfg.disc_feature_dim, r, cfg.mlp_ratio)
    params = disc.init(jax.random.key(1), real)['params']
    tx = optax.adamw(c.optimizer.learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def d_step(params, opt_state):
      def loss_fn(p):
        logits, _ = disc.apply({'params': p}, images)
        labels = jnp.concatenate([jnp.ones(b), jnp.zeros(2 * b)])
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    entry = {'tokens_per_block': tome.token_counts((s // cfg.disc_patch_size) ** 2, r, cfg.disc_depth)}
    entry['disc_step_s'], entry['disc_step_all_s'] = _time(d_step, params, opt_state, steps=args.steps)
    if not args.no_full:
      model = models.build(c, 100)
      state = jax.jit(model.init)(jax.random.key(2), {'image': real}, {})
      step = jax.jit(model.train_step)
      entry['full_step_s'], entry['full_step_all_s'] = _time(
          step, state, {'image': real}, jax.random.key(3), {}, steps=args.steps)
    out['results'][f'r={r}'] = entry
  if 'r=0' in out['results']:
    base = out['results']['r=0']
    for key, entry in out['results'].items():
      for what in ('disc_step_s', 'full_step_s'):
        if what in entry:
          entry[what.replace('_s', '_saving')] = 1.0 - entry[what] / base[what]
  out['config'] = {'image_size': s, 'batch_size': b, 'disc_depth': cfg.disc_depth,
                   'disc_width': cfg.disc_width, 'disc_patch_size': cfg.disc_patch_size}
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
