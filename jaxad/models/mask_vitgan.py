"""Mask-ViT-GAN: U-ViT GAN with multi-scale complementary block masks and ToMe.

Zhao et al., "Metal Surface Defect Detection Based on a Transformer with Multi-Scale Mask Feature
Fusion", Sensors 2023. Results and deviations: docs/models/mask_vitgan.md.

* Masks (Sec. 2.2, Fig. 5): three scales; at each a checkerboard of n x n square blocks (n even, so
  white:black is exactly 1:1) and its complement. Mask value 1 ("white") = removed: those pixels
  are set to 0 before the generator.
* Generator (Sec. 2.1, Fig. 2-4, Sec. 3.2): a U-ViT [27] of `depth` = n + 1 + n Transformer blocks
  (13 = 6 + 1 + 6 in the paper): patch embedding + fixed sincos positions and n in-blocks (the
  encoder), one mid-block, n out-blocks, LayerNorm, a linear patch head, unpatchify, then a 3x3
  convolution. Out-block j is fed linear(concat(h_main, h_skip)) with h_skip the output of in-block
  n-1-j (U-ViT's long skips: first in-block -> last out-block, ...). The latent z of L_enc is the last
  in-block's output (the tokens entering the mid-block); the extra encoder, the encoder part's
  architecture (patch embedding + n in-blocks), re-encodes the reconstruction to z_hat, with its own
  weights or, with `share_encoder`, the generator's.
* Discriminator (Sec. 2.1.3, 2.3): ViT whose blocks merge r tokens each (ToMe, jaxad/models/tome.py),
  LayerNorm, size-weighted mean over tokens, a hidden "middle" layer (the features f used for
  feature matching) and a linear layer to one logit; D(x) = sigmoid(logit).
* Training (Sec. 2.4.1): per image a random scale (from the step rng); both complementary masked
  copies are reconstructed. D is updated first (BCE: real -> 1, both reconstructions -> 0), then G
  with D's new weights: L = a1 L_adv + a2 L_enc + a3 L_con (Eq. 1-5), L_adv = ||f(x) - f(x_hat)||^2,
  L_enc = ||z - z_hat||^2, L_con = L1 + (1 - SSIM) + L1 of image gradients. Not in the paper:
  `mask_vitgan.structure_warmup = (start, end)`: L_con = L1 + w (SSIM and gradient terms) with w = 0 before
  generator step `start`, rising linearly to 1 at `end` (started with w = 1, the small default
  generator can stall at one input-independent output on the embedded data).
* Test (Sec. 2.4.2, Eq. 6-9): all six masked copies are reconstructed; each complementary pair is
  merged over its removed areas, O_i = O_i1 M_i1 + O_i2 M_i2; E_i = |O_i - I| or (O_i - I)^2
  (`error`, channel mean); the final map is E_f with f = argmax_i (average(E_i) - mu_i), where mu_i
  is the per-scale reference: the mean of average(E_i) over the category's normal training images,
  as SCADN keeps it (the `reference` hook; the harness stores it in the category's calibration).
  `select` offers the |.| reading and the plain average too. The image score is the mean or the
  maximum (`image_score`) of the final map, Gaussian-smoothed when `smoothing_sigma` > 0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from jaxad import losses, optim
from jaxad.models import AnomalyModel, ModelContext, layers, tome

# Config fields of the `mask_vitgan` block that only change scoring: a finished run may be rescored with
# other values (jaxad.provenance).
SCORING_FIELDS = ('error', 'select', 'smoothing_sigma', 'image_score')
# Config fields that change the parameter layout, with the value a record without them implies: a run
# is only resumed or loaded with the layout its checkpoints have (jaxad.provenance).
LAYOUT_FIELDS = {'scan_blocks': False}


def complementary_masks(image_size: int, cells: tuple[int, ...]) -> np.ndarray:
  """[S, 2, H, W] float32 masks, 1 = removed: per scale an n x n block checkerboard and its complement."""
  out = []
  for n in cells:
    if n % 2 or image_size % n:
      raise ValueError(f'mask_cells entry {n} must be even and divide image_size {image_size}')
    block = image_size // n
    idx = np.arange(image_size) // block
    checker = ((idx[:, None] + idx[None, :]) % 2).astype(np.float32)
    out.append(np.stack([checker, 1.0 - checker]))
  return np.stack(out)


def _patch_embed(x, patch_size, width, dtype, name):
  b, h, w, _ = x.shape
  gh, gw = h // patch_size, w // patch_size
  x = nn.Conv(
    width, (patch_size, patch_size), strides=(patch_size, patch_size), padding='VALID', dtype=dtype, name=name
  )(x)
  pos = jnp.asarray(layers.sincos_pos_embed_2d(gh, gw, width))
  return x.reshape(b, gh * gw, width) + pos.astype(x.dtype)


def uvit_split(depth: int) -> int:
  """In-blocks (= out-blocks) of a U-ViT of `depth` blocks in all: depth = 2 n + 1 (one mid-block)."""
  if depth < 3 or depth % 2 == 0:
    raise ValueError(
      f'mask_vitgan.depth {depth} must be odd and >= 3: n >= 1 in-blocks + 1 mid-block + n out-blocks'
    )
  return depth // 2


def _carry_and_emit(block, x, _):
  y = block(x)
  return y, y


class SkipBlock(nn.Module):
  """A U-ViT out-block with its long skip: Block(linear(concat(h_main, h_skip))) (the scanned layout)."""

  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None  # layers.Attention.implementation.

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array) -> tuple[jax.Array, None]:
    x = nn.Dense(self.width, dtype=self.dtype, name='skip_linear')(jnp.concatenate([x, skip], -1))
    x = layers.Block(self.num_heads, self.mlp_ratio, self.dtype, self.attention_implementation, name='block')(
      x
    )
    return x, None


def scanned_layout(params: dict) -> dict:
  """Generator or extra-encoder params of the unrolled layout (`in_block_{i}`, `skip_linear_{j}`,
  `out_block_{j}`) in the `scan_blocks` layout: `in_block` stacked, and `out_block` stacked (with
  long skips, each out-block's {'skip_linear', 'block'})."""
  return _stack_out_blocks(layers.stack_block_params(params, 'in_block'))


def _stack_out_blocks(params):
  if not isinstance(params, dict):
    return params
  numbered = ('skip_linear_', 'out_block_')
  out = {k: _stack_out_blocks(v) for k, v in params.items() if not k.startswith(numbered)}
  n = sum(k.startswith('out_block_') for k in params)
  if n:
    blocks = [params[f'out_block_{j}'] for j in range(n)]
    if 'skip_linear_0' in params:
      blocks = [{'skip_linear': params[f'skip_linear_{j}'], 'block': b} for j, b in enumerate(blocks)]
    out['out_block'] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
  return out


class UViTEncoder(nn.Module):
  """Image [B, H, W, C] -> the in-blocks' outputs [num_blocks, B, N, D] (patch embedding, fixed sincos
  positions, `num_blocks` Transformer blocks); the last is the latent the generator passes on.

  `scan_blocks`: the in-blocks as one `nn.scan` over params stacked under `in_block` (compiled once)
  instead of submodules `in_block_{i}` (`scanned_layout` maps one layout onto the other).
  """

  patch_size: int
  width: int
  num_blocks: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None  # layers.Attention.implementation.
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    x = _patch_embed(image.astype(self.dtype), self.patch_size, self.width, self.dtype, 'patch_embed')
    block = lambda name: layers.Block(
      self.num_heads, self.mlp_ratio, self.dtype, self.attention_implementation, name=name
    )
    if self.scan_blocks:
      body = nn.scan(
        _carry_and_emit, variable_axes={'params': 0}, split_rngs={'params': True}, length=self.num_blocks
      )
      return body(block('in_block'), x, None)[1]
    hs = []
    for i in range(self.num_blocks):
      x = block(f'in_block_{i}')(x)
      hs.append(x)
    return jnp.stack(hs)


class UViTGenerator(nn.Module):
  """Masked image [B, H, W, C] -> (reconstruction [B, H, W, C], latent z [B, N, D]).

  U-ViT (Bao et al., CVPR 2023) of `depth` = n + 1 + n blocks: the encoder (patch embedding, n
  in-blocks), one mid-block, n out-blocks, LayerNorm, a linear patch head and a 3x3 convolution.
  Out-block j first takes linear(concat(h_m, h_s)) with h_s the output of in-block n-1-j (the long
  skips, Sec. 2.1.2, Fig. 4). z is the last in-block's output, the tokens entering the mid-block.
  `scan_blocks`: in-blocks and out-blocks (with their skip linears) each as one `nn.scan` over stacked
  params, compiled once (`scanned_layout`).
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  channels: int
  mlp_ratio: float = 4.0
  long_skips: bool = True
  out_conv: bool = True
  small_head: bool = True
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None  # layers.Attention.implementation.
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, image: jax.Array):
    """small_head: the patch head starts near zero (std 0.02, as timm's ViT Linear layers), its
    output is read around mid-grey (+0.5) and the 3x3 conv is a zero-initialised residual, so the
    first reconstruction is grey instead of N(0, 1) noise, which AdamW at 1e-4..5e-4 per step needs
    hundreds of steps to undo. False: Flax default inits and a plain conv."""
    b, h, w, _ = image.shape
    p = self.patch_size
    n = uvit_split(self.depth)
    block = lambda name: layers.Block(
      self.num_heads, self.mlp_ratio, self.dtype, self.attention_implementation, name=name
    )
    hs = UViTEncoder(
      p,
      self.width,
      n,
      self.num_heads,
      self.mlp_ratio,
      self.dtype,
      self.attention_implementation,
      self.scan_blocks,
      name='encoder',
    )(image)
    z = hs[-1]
    x = block('mid_block')(z)
    if self.scan_blocks and self.long_skips:
      skip_block = SkipBlock(
        self.width,
        self.num_heads,
        self.mlp_ratio,
        self.dtype,
        self.attention_implementation,
        name='out_block',
      )
      body = nn.scan(
        lambda mdl, x, skip: mdl(x, skip), variable_axes={'params': 0}, split_rngs={'params': True}, length=n
      )
      x, _ = body(skip_block, x, hs[::-1])  # Out-block j gets in-block n-1-j's output.
    elif self.scan_blocks:
      x = layers.repeat_blocks(block, n, True, 'out_block')(x)
    else:
      for j in range(n):
        if self.long_skips:  # U-ViT: concat(h_m, h_s) -> linear, before the block.
          x = nn.Dense(self.width, dtype=self.dtype, name=f'skip_linear_{j}')(
            jnp.concatenate([x, hs[n - 1 - j]], -1)
          )
        x = block(f'out_block_{j}')(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    head_init = nn.initializers.normal(0.02) if self.small_head else nn.initializers.lecun_normal()
    x = nn.Dense(p * p * self.channels, kernel_init=head_init, dtype=self.dtype, name='decoder_pred')(x)
    x = layers.unpatchify(x, h // p, w // p, p, self.channels) + (0.5 if self.small_head else 0.0)
    if self.out_conv:  # 3x3 conv against ViT patch artifacts (Sec. 2.1.2).
      if self.small_head:
        x = x + nn.Conv(
          self.channels,
          (3, 3),
          padding='SAME',
          kernel_init=nn.initializers.zeros,
          dtype=self.dtype,
          name='out_conv',
        )(x)
      else:
        x = nn.Conv(self.channels, (3, 3), padding='SAME', dtype=self.dtype, name='out_conv')(x)
    return x.astype(jnp.float32), z.astype(jnp.float32)


class ToMeDiscriminator(nn.Module):
  """Image [B, H, W, C] -> (logit [B], middle-layer features [B, feature_dim]); D = sigmoid(logit)."""

  patch_size: int
  width: int
  depth: int
  num_heads: int
  feature_dim: int
  r: int = 0
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array):
    x = _patch_embed(image.astype(self.dtype), self.patch_size, self.width, self.dtype, 'patch_embed')
    size = jnp.ones(x.shape[:2], jnp.float32)
    for i in range(self.depth):
      x, size = tome.ToMeBlock(self.num_heads, self.mlp_ratio, self.r, self.dtype, name=f'block_{i}')(x, size)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x).astype(jnp.float32)
    pooled = jnp.sum(x * size[..., None], axis=1) / jnp.sum(size, axis=1, keepdims=True)
    features = nn.gelu(
      nn.Dense(self.feature_dim, dtype=self.dtype, name='middle')(pooled), approximate=False
    ).astype(jnp.float32)
    logit = nn.Dense(1, dtype=self.dtype, name='head')(features)[:, 0]
    return logit.astype(jnp.float32), features


def gradient_l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """L1 distance of the forward-difference image gradients (Eq. 4), averaged over both directions."""
  dy = lambda x: x[:, 1:] - x[:, :-1]
  dx = lambda x: x[:, :, 1:] - x[:, :, :-1]
  return 0.5 * (jnp.mean(jnp.abs(dy(a) - dy(b))) + jnp.mean(jnp.abs(dx(a) - dx(b))))


def consistency_loss(
  target: jax.Array, recon: jax.Array, structure_weight: jax.Array | float = 1.0
) -> tuple[jax.Array, dict]:
  """L_con = L1 + w (1 - SSIM + gradient L1) (Eq. 1-4 with w = 1; `mask_vitgan.structure_warmup` ramps w)."""
  l1 = jnp.mean(jnp.abs(recon - target))
  ssim = losses.ssim_loss(recon, target)
  grad = gradient_l1(target, recon)
  con = l1 + structure_weight * ssim + structure_weight * grad  # w = 1: (l1 + ssim) + grad, Eq. 1's order.
  return con, {'l1': l1, 'ssim_loss': ssim, 'gradient_l1': grad}


def select_error_map(errors: jax.Array, rule: str, mu: jax.Array | None = None) -> jax.Array:
  """errors [B, S, H, W] -> final map [B, H, W] (Eq. 8-9).

  mu [S]: the per-scale reference mu_i, the mean of average(E_i) over the normal training images
  (`reference` in `build`); 'eq8' picks f = argmax_i (average(E_i) - mu_i), 'distance' the scale
  furthest from its reference either way, 'mean' averages the three maps (mu unused).
  """
  if rule == 'mean':
    return jnp.mean(errors, axis=1)
  offset = jnp.mean(errors, axis=(2, 3)) - mu  # average(E_i) - mu_i  [B, S]
  if rule == 'eq8':
    f = jnp.argmax(offset, axis=1)
  elif rule == 'distance':
    f = jnp.argmax(jnp.abs(offset), axis=1)
  else:
    raise ValueError(f"Unknown select rule {rule!r}; expected 'eq8', 'distance' or 'mean'.")
  return jnp.take_along_axis(errors, f[:, None, None, None], axis=1)[:, 0]


def build(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> AnomalyModel:
  dtype, size, channels = ctx.dtype, ctx.image_size, ctx.channels
  for name, p in (('patch_size', cfg.patch_size), ('disc_patch_size', cfg.disc_patch_size)):
    if size % p:
      raise ValueError(f'mask_vitgan.{name} {p} does not divide image_size {size}')
  start, end = cfg.structure_warmup
  if not 0 <= start <= end:
    raise ValueError(f'mask_vitgan.structure_warmup {tuple(cfg.structure_warmup)} needs 0 <= start <= end')
  masks = jnp.asarray(complementary_masks(size, tuple(cfg.mask_cells)))  # [S, 2, H, W]
  num_scales = masks.shape[0]
  gen = UViTGenerator(
    cfg.patch_size,
    cfg.width,
    cfg.depth,
    cfg.num_heads,
    channels,
    cfg.mlp_ratio,
    cfg.long_skips,
    cfg.out_conv,
    cfg.small_head,
    dtype,
    attention_implementation=ctx.attention_implementation,
    scan_blocks=cfg.scan_blocks,
  )
  # The extra encoder of L_enc: the generator's encoder part (patch embedding + in-blocks), its own
  # weights or, with `share_encoder`, the generator's.
  enc = UViTEncoder(
    cfg.patch_size,
    cfg.width,
    uvit_split(cfg.depth),
    cfg.num_heads,
    cfg.mlp_ratio,
    dtype,
    attention_implementation=ctx.attention_implementation,
    scan_blocks=cfg.scan_blocks,
  )

  def encode(g_params, image):
    """z_hat [B, N, D]: the extra encoder's last in-block output for `image`."""
    params = g_params['generator']['encoder'] if cfg.share_encoder else g_params['encoder']
    return enc.apply({'params': params}, image)[-1].astype(jnp.float32)

  disc = ToMeDiscriminator(
    cfg.disc_patch_size,
    cfg.disc_width,
    cfg.disc_depth,
    cfg.disc_num_heads,
    cfg.disc_feature_dim,
    cfg.tome_r,
    cfg.mlp_ratio,
    dtype,
  )
  a_adv, a_enc, a_con = (float(a) for a in cfg.alpha)
  g_tx = ctx.make_optimizer()
  d_tx = ctx.make_optimizer()

  def init(rng, batch, frozen):
    del frozen
    x = batch['image']
    kg, ke, kd = jax.random.split(rng, 3)
    g_params = {'generator': gen.init(kg, x)['params']}
    if not cfg.share_encoder:
      g_params['encoder'] = enc.init(ke, x)['params']
    d_params = disc.init(kd, x)['params']
    return {
      'g': train_state.TrainState.create(apply_fn=gen.apply, params=g_params, tx=g_tx),
      'd': train_state.TrainState.create(apply_fn=disc.apply, params=d_params, tx=d_tx),
    }

  def train_step(state, batch, rng, frozen):
    del frozen
    x = batch['image'].astype(jnp.float32)
    b = x.shape[0]
    scale = jax.random.randint(rng, (b,), 0, num_scales)
    removed = masks[scale][..., None]  # [B, 2, H, W, 1]
    masked = (x[:, None] * (1.0 - removed)).reshape((2 * b,) + x.shape[1:])
    target = jnp.repeat(x, 2, axis=0)  # row 2i+j: image i, mask j
    g_step = state['g'].step

    # One generator forward serves both updates (optim.paired_gan_update).
    def generate(p):
      return gen.apply({'params': p['generator']}, masked), {}

    # (1) Discriminator, generator fixed: real -> 1, both reconstructions -> 0.
    def d_loss_fn(d_params, outputs):
      fake, _ = outputs
      logits, _ = disc.apply({'params': d_params}, jnp.concatenate([x, fake]))
      real, fake_logits = logits[:b], logits[b:]
      loss = jnp.mean(optax.sigmoid_binary_cross_entropy(real, jnp.ones_like(real))) + jnp.mean(
        optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
      )
      return loss, (
        {},
        {'d_real': jnp.mean(jax.nn.sigmoid(real)), 'd_fake': jnp.mean(jax.nn.sigmoid(fake_logits))},
      )

    # (2) Generator with the updated discriminator fixed (Eq. 5); the extra encoder is part of G.
    def g_loss_fn(g_params, outputs, d_state):
      recon, z = outputs
      z_hat = encode(g_params, recon)
      _, feats = disc.apply({'params': d_state.params}, jnp.concatenate([x, recon]))
      real_f = jax.lax.stop_gradient(jnp.repeat(feats[:b], 2, axis=0))
      adv = jnp.mean(jnp.square(real_f - feats[b:]))
      enc_loss = jnp.mean(jnp.square(z - z_hat))
      structure_weight = jnp.clip((g_step - start + 1) / max(end - start, 1), 0.0, 1.0)
      con, parts = consistency_loss(target, recon, structure_weight)
      total = a_adv * adv + a_enc * enc_loss + a_con * con
      return total, {'adv': adv, 'enc': enc_loss, 'con': con, **parts}

    g_state, d_state, metrics = optim.paired_gan_update(
      state['g'], state['d'], generate, d_loss_fn, g_loss_fn
    )
    return {'g': g_state, 'd': d_state}, {**metrics, 'scale': jnp.mean(scale.astype(jnp.float32))}

  def reconstruct_scales(g_params, x):
    """x [B, H, W, C] -> merged reconstructions O_i [B, S, H, W, C] (Eq. 6)."""
    b = x.shape[0]
    removed = masks[None, ..., None]  # [1, S, 2, H, W, 1]
    masked = (x[:, None, None] * (1.0 - removed)).reshape((b * num_scales * 2,) + x.shape[1:])
    recon, _ = gen.apply({'params': g_params['generator']}, masked)
    recon = recon.reshape((b, num_scales, 2) + x.shape[1:])
    return jnp.sum(recon * removed, axis=2)

  def error_maps(g_params, x):
    """E_i [B, S, H, W] (Eq. 7): per-pixel error of each scale's merged reconstruction, channel mean."""
    merged = reconstruct_scales(g_params, x)
    if cfg.error == 'l1':
      return jnp.mean(jnp.abs(merged - x[:, None]), axis=-1)
    if cfg.error == 'l2':
      return jnp.mean(jnp.square(merged - x[:, None]), axis=-1)
    raise ValueError(f"Unknown mask_vitgan.error {cfg.error!r}; expected 'l1' or 'l2'.")

  def reference(state, batch, frozen):
    """average(E_i) per image [B, S]; the harness's mean over a category's training images is mu_i."""
    del frozen
    return {'mu': jnp.mean(error_maps(state['g'].params, batch['image'].astype(jnp.float32)), axis=(2, 3))}

  def score(state, batch, frozen):
    del frozen
    errors = error_maps(state['g'].params, batch['image'].astype(jnp.float32))
    mu = None if cfg.select == 'mean' else state['reference']['mu']
    maps = layers.gaussian_blur(select_error_map(errors, cfg.select, mu), cfg.smoothing_sigma)
    if cfg.image_score == 'max':
      scores = jnp.max(maps, axis=(1, 2))
    elif cfg.image_score == 'mean':
      scores = jnp.mean(maps, axis=(1, 2))
    else:
      raise ValueError(f"Unknown mask_vitgan.image_score {cfg.image_score!r}; expected 'max' or 'mean'.")
    return maps, scores

  return AnomalyModel(init=init, train_step=train_step, score=score, reference=reference)
