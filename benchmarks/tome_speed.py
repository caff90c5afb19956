"""Train-step time with ToMe r=2 vs r=0 in the Mask-ViT-GAN discriminator (the paper's Table 10).

  python benchmarks/tome_speed.py                       # default config, discriminator step and full step
  python benchmarks/tome_speed.py --variant paper --image-size 256 --batch 8 --steps 5

Times (median of --steps runs, r values interleaved, after one compile-and-warm-up call) of
  disc:  the discriminator's value_and_grad + AdamW update on [real; 2 reconstructions] (3B images);
  full:  the whole jitted GAN `train_step` (generator forward/backward, D then G updates).
Prints one JSON object: per r the step times and the discriminator's token counts per block.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from configs import mask_vitgan as mask_vitgan_config  # noqa: E402
from jaxad import train  # noqa: E402
from jaxad.models import mask_vitgan, tome  # noqa: E402


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
  timed = {}  # (r, what) -> (fn, args); compiled first, then timed interleaved over r (load drifts).
  for r in args.r:
    c = mask_vitgan_config.get_config(args.variant or None)
    if args.image_size:
      c.dataset.image_size = args.image_size
    if args.batch:
      c.batch_size = args.batch
    c.mask_vitgan.tome_r = r
    b, s = c.batch_size, c.dataset.image_size
    real = jax.random.uniform(jax.random.key(0), (b, s, s, c.dataset.channels))
    images = jnp.concatenate([real, real, real])  # D sees the reals and both reconstructions.
    cfg = c.mask_vitgan
    disc = mask_vitgan.ToMeDiscriminator(
      cfg.disc_patch_size,
      cfg.disc_width,
      cfg.disc_depth,
      cfg.disc_num_heads,
      cfg.disc_feature_dim,
      r,
      cfg.mlp_ratio,
    )
    params = disc.init(jax.random.key(1), real)['params']
    tx = optax.adamw(c.optimizer.learning_rate)
    opt_state = tx.init(params)

    def d_step(params, opt_state, disc=disc, images=images, b=b, tx=tx):
      def loss_fn(p):
        logits, _ = disc.apply({'params': p}, images)
        labels = jnp.concatenate([jnp.ones(b), jnp.zeros(2 * b)])
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    out['results'][f'r={r}'] = {
      'tokens_per_block': tome.token_counts((s // cfg.disc_patch_size) ** 2, r, cfg.disc_depth)
    }
    timed[(r, 'disc_step')] = (jax.jit(d_step), (params, opt_state))
    if not args.no_full:
      model = train.build_model(c, 100)
      state = jax.jit(model.init)(jax.random.key(2), {'image': real}, {})
      timed[(r, 'full_step')] = (jax.jit(model.train_step), (state, {'image': real}, jax.random.key(3), {}))
  for fn, fargs in timed.values():
    jax.block_until_ready(fn(*fargs))  # Compile + warm up.
  times = {k: [] for k in timed}
  for _ in range(args.steps):
    for k, (fn, fargs) in timed.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*fargs))
      times[k].append(time.perf_counter() - t)
  for (r, what), ts in times.items():
    out['results'][f'r={r}'][f'{what}_s'] = statistics.median(ts)
    out['results'][f'r={r}'][f'{what}_all_s'] = ts
  if 'r=0' in out['results']:
    base = out['results']['r=0']
    for key, entry in out['results'].items():
      for what in ('disc_step_s', 'full_step_s'):
        if what in entry:
          entry[what[:-2] + '_saving'] = 1.0 - entry[what] / base[what]
          if what[:-2] + '_all_s' in entry:  # Median of per-repetition ratios (robust to drift).
            pairs = zip(entry[what[:-2] + '_all_s'], base[what[:-2] + '_all_s'])
            entry[what[:-2] + '_paired_saving'] = 1.0 - statistics.median(t / t0 for t, t0 in pairs)
  out['config'] = {
    'image_size': s,
    'batch_size': b,
    'disc_depth': cfg.disc_depth,
    'disc_width': cfg.disc_width,
    'disc_patch_size': cfg.disc_patch_size,
  }
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
