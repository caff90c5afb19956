"""ViT-Mem-CA: ViT autoencoder with a memory module and coordinate attention.

Yang and Guo, "An Unsupervised Method for Industrial Image Anomaly Detection with Vision
Transformer-Based Autoencoder", Sensors 2024. Results and deviations: docs/models/vit_memae.md.

Pipeline (Fig. 2, Sec. 3):
  X in [0, 1] -> scaled to [-1, 1] -> ViT encoder (patch embedding, [cls] token, learned position
  embedding E_pos in R^{(N+1) x D}, pre-norm blocks; Eq. 4-6) -> the N patch embeddings rearranged into
  a feature map F [H/P, W/P, D] (the [cls] output is dropped) -> memory module: every spatial feature z
  is replaced by w_hat M, cosine addressing + softmax, hard shrinkage at 1/N, L1 renormalisation
  (Eq. 7-10) -> coordinate attention (Sec. 3.3; `coord_attention_placement` puts it before the memory
  instead) -> decoder: six transposed convs (strides multiply to P: H/P -> H), BatchNorm + ReLU after
  each but the last, which outputs the image channels through tanh (Sec. 3.4; `decoder_output='deconv'`,
  :paper), or BatchNorm + ReLU after all six, then a 3x3 conv to the image channels and tanh ('conv').
  The tanh output in [-1, 1] is mapped back to [0, 1]: every loss and map is in input units.

Loss (Eq. 11-15): lambda_recon * (L2 + lambda_ssim * block-SSIM) + lambda_ent * entropy(w_hat), L2 =
(1/WH) ||X - X_hat||^2 summed over channels (Eq. 11).
Anomaly map: the per-pixel form of the reconstruction loss, squared error (mean over channels) +
map_ssim_weight * (1 - SSIM) (Sec. 1, contribution 4: L2 and SSIM "calculate the anomaly score"),
smoothed with a Gaussian (Sec. 4.2); image score = max of the map (the paper does not say).

Ablation (Table 6): config.vit_memae.use_memory / use_coord_attention (base, +M, +CA, +M+CA).
"""

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad import losses, optim
from jaxad.models import AnomalyModel, ModelContext, layers

# Config fields of the `vit_memae` block that only change scoring: a finished run may be rescored with
# other values (jaxad.provenance).
SCORING_FIELDS = ('map_ssim_weight', 'smoothing_sigma')
# Config fields that change the parameter layout, with the value a record without them implies: a run
# is only resumed or loaded with the layout its checkpoints have (jaxad.provenance).
LAYOUT_FIELDS = {'scan_blocks': False, 'decoder_output': 'conv'}
# Config fields added after runs were recorded, with the value a record without them implies
# (jaxad.provenance.implied_fields).
ADDED_FIELDS = {'coord_attention_placement': 'after_memory', 'l2_channels': 'mean'}
# Where coordinate attention sits (Sec. 3.3): on the memory's output F' (Fig. 2) or on the encoder's F.
CA_PLACEMENTS = ('after_memory', 'before_memory')
# How Eq. 11's L2 reduces the channels: 'sum' as ||X - X_hat||^2 / (WH), 'mean' divides by C too.
L2_CHANNELS = ('sum', 'mean')
# The decoder's output layer: 'deconv', the last transposed conv (Sec. 3.4), or 'conv', an added 3x3 conv.
DECODER_OUTPUTS = ('deconv', 'conv')


def hard_shrink(w: jax.Array, threshold: float, eps: float = 1e-12) -> jax.Array:
  """MemAE hard shrinkage max(w - t, 0) * w / (|w - t| + eps): w where w > t, else 0 (continuous)."""
  return jax.nn.relu(w - threshold) * w / (jnp.abs(w - threshold) + eps)


class Memory(nn.Module):
  """MemAE memory: N items of width C, addressed by each query's cosine similarity (Gong et al. 2019).

  z [..., C] -> (z_hat [..., C], weights [..., N]): w = softmax(cos(z, m_i) / temperature),
  hard-shrunk at `shrink_scale / N` and L1-renormalised, z_hat = w M. shrink_scale 0 disables it.
  """

  num_items: int
  shrink_scale: float = 1.0
  temperature: float = 1.0
  eps: float = 1e-12

  @nn.compact
  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    width = z.shape[-1]
    bound = 1.0 / np.sqrt(width)
    init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)  # As MemAE.
    items = self.param('items', init, (self.num_items, width))
    return self.address(z.astype(jnp.float32), items)

  def address(self, z: jax.Array, items: jax.Array) -> tuple[jax.Array, jax.Array]:
    zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), self.eps)
    mn = items / jnp.maximum(jnp.linalg.norm(items, axis=-1, keepdims=True), self.eps)
    sim = jnp.einsum('...c,nc->...n', zn, mn, precision=jax.lax.Precision.HIGHEST)
    w = jax.nn.softmax(sim / self.temperature, axis=-1)
    if self.shrink_scale > 0:
      w = hard_shrink(w, self.shrink_scale / self.num_items, self.eps)
      w = w / jnp.maximum(jnp.sum(jnp.abs(w), axis=-1, keepdims=True), self.eps)
    z_hat = jnp.einsum('...n,nc->...c', w, items, precision=jax.lax.Precision.HIGHEST)
    return z_hat, w


class CoordinateAttention(nn.Module):
  """Coordinate attention (Hou et al., CVPR 2021) on [B, H, W, C]; the output has the input's shape.

  Average pools along W and along H, a shared 1x1 conv + BatchNorm + non-linearity on their
  concatenation, split, then per-direction 1x1 convs with sigmoid gates: y = x * g_h * g_w.
  BatchNorm keeps running statistics in the 'batch_stats' collection (`train` picks batch stats).
  """

  reduction: int = 32
  min_hidden: int = 8
  activation: Callable[[jax.Array], jax.Array] = jax.nn.hard_swish
  gate_bias_init: Callable = nn.initializers.zeros
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    _, h, w, c = x.shape
    hidden = max(self.min_hidden, c // self.reduction)
    pooled_h = jnp.mean(x, axis=2)  # [B, H, C]: average over W ("X Avg Pool" in Fig. 4).
    pooled_w = jnp.mean(x, axis=1)  # [B, W, C]: average over H.
    y = jnp.concatenate([pooled_h, pooled_w], axis=1)[:, :, None, :]  # [B, H + W, 1, C]
    y = nn.Conv(hidden, (1, 1), dtype=self.dtype, name='conv_shared')(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name='bn')(
      y
    )
    y = self.activation(y)
    gate = lambda name, t: jax.nn.sigmoid(
      nn.Conv(c, (1, 1), dtype=self.dtype, bias_init=self.gate_bias_init, name=name)(t)
    )
    g_h = gate('conv_h', y[:, :h])  # [B, H, 1, C]
    g_w = gate('conv_w', y[:, h:]).transpose(0, 2, 1, 3)  # [B, 1, W, C]
    return x * g_h.astype(x.dtype) * g_w.astype(x.dtype)


def _transpose_phases(kernel_size: int, stride: int) -> list[tuple[int, int]]:
  """For each output phase a of a 'SAME' transposed conv: (first tap t0, input offset d0).

  lax.conv_transpose(x, k, s, 'SAME') gives y[s*p + a] = sum_t k[t] x[p + (a + t - pad) / s] over the
  taps t with (a + t - pad) divisible by s (pad: lax's 'SAME' transpose padding), i.e. t = t0 + j*s
  reading x[p + d0 + j]: every phase is a stride-1 correlation of x with the sub-kernel k[t0::s].
  """
  pad_len = kernel_size + stride - 2
  pad = kernel_size - 1 if stride > kernel_size - 1 else int(np.ceil(pad_len / 2))
  phases = []
  for a in range(stride):
    t0 = (pad - a) % stride
    phases.append((t0, (a + t0 - pad) // stride))
  return phases


class SubpixelConvTranspose(nn.Module):
  """`nn.ConvTranspose(features, (k, k), strides=(s, s), padding='SAME')`: same parameters, same output.

  Computed as s*s stride-1 convolutions of the input with the phase sub-kernels k[ty::s, tx::s],
  interleaved by depth-to-space, because XLA:CPU runs the input-dilated convolution of a strided
  transposed conv (and its gradient) on a slow generic path: >10x faster on CPU for k=4, s=2.
  """

  features: int
  kernel_size: int
  stride: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.stride
    b, h, w, cin = x.shape
    kernel = self.param('kernel', self.kernel_init, (k, k, cin, self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    phases = _transpose_phases(k, s)
    rows = []
    for ty, dy in phases:
      cols = []
      for tx, dx in phases:
        sub = kernel[ty::s, tx::s]
        ny, nx = sub.shape[:2]
        if ny == 0 or nx == 0:  # kernel_size < stride: this phase gets no tap.
          cols.append(jnp.zeros((b, h, w, self.features), x.dtype))
          continue
        cols.append(
          jax.lax.conv_general_dilated(
            x,
            sub,
            (1, 1),
            ((-dy, dy + ny - 1), (-dx, dx + nx - 1)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          )
        )
      rows.append(jnp.stack(cols, axis=3))  # [B, H, W, s (x phase), F]
    y = jnp.stack(rows, axis=2)  # [B, H, s (y phase), W, s, F]
    y = y.reshape(b, h * s, w * s, self.features)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,)).astype(y.dtype)
    return y


class ViTEncoder(nn.Module):
  """ViT encoder (Eq. 4-6): returns the patch embeddings as a map [B, H/P, W/P, D] and the [cls] output."""

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None  # layers.Attention.implementation.
  scan_blocks: bool = False  # layers.repeat_blocks: the block compiled once.

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, h, w, _ = x.shape
    p = self.patch_size
    gh, gw = h // p, w // p
    # X_p E: a PxP stride-P conv is the linear projection of the flattened patches.
    tokens = nn.Conv(
      self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='patch_embed'
    )(x).reshape(b, gh * gw, self.width)
    cls = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, self.width))
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, gh * gw + 1, self.width))
    z = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(tokens.dtype), tokens], 1)
    z = z + pos.astype(z.dtype)
    block = lambda n: layers.Block(
      self.num_heads, self.mlp_ratio, self.dtype, self.attention_implementation, name=n
    )
    z = layers.repeat_blocks(block, self.depth, self.scan_blocks, 'block')(z)
    z = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(z)
    return z[:, 1:].reshape(b, gh, gw, self.width), z[:, 0]


class Decoder(nn.Module):
  """Transposed convs (stride 2: 4x4 kernel, stride 1: 3x3) with BN + ReLU, then tanh.

  output 'deconv' (Sec. 3.4): the last transposed conv outputs `out_channels` (no BN, no ReLU) into tanh;
  `channels` are the widths of all stages but the last. 'conv': every stage has BN + ReLU, `channels`
  are all their widths, and a 3x3 conv to `out_channels` follows.
  """

  channels: tuple[int, ...]
  strides: tuple[int, ...]
  out_channels: int
  output: str = 'deconv'  # One of DECODER_OUTPUTS.
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    deconv_out = self.output == 'deconv'
    widths = (*self.channels, self.out_channels) if deconv_out else tuple(self.channels)
    last = len(widths) - 1
    for i, (c, s) in enumerate(zip(widths, self.strides)):
      k = 4 if s == 2 else 3
      output_stage = deconv_out and i == last
      # = nn.ConvTranspose(c, (k, k), strides=(s, s), padding='SAME'), fast on CPU too.
      x = SubpixelConvTranspose(c, k, s, use_bias=output_stage, dtype=self.dtype, name=f'deconv_{i}')(x)
      if not output_stage:
        x = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=f'bn_{i}'
        )(x)
        x = nn.relu(x)
    if not deconv_out:
      x = nn.Conv(self.out_channels, (3, 3), padding='SAME', dtype=self.dtype, name='head')(x)
    return jnp.tanh(x.astype(jnp.float32))


class ViTMemAE(nn.Module):
  """Images [B, H, W, C] in [0, 1] -> (reconstruction in [0, 1], addressing weights [B, h, w, N] or None)."""

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float
  decoder_channels: tuple[int, ...]
  decoder_strides: tuple[int, ...]
  decoder_output: str = 'deconv'  # Decoder.output.
  out_channels: int = 3
  use_memory: bool = True
  use_coord_attention: bool = True
  coord_attention_placement: str = 'after_memory'  # One of CA_PLACEMENTS.
  num_memory: int = 100
  shrink_scale: float = 1.0
  memory_temperature: float = 1.0
  ca_reduction: int = 32
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None  # layers.Attention.implementation.
  scan_blocks: bool = False  # ViTEncoder.scan_blocks.

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
    x = (2.0 * images - 1.0).astype(self.dtype)  # [0, 1] -> [-1, 1], the range of the tanh output.
    f, _ = ViTEncoder(
      self.patch_size,
      self.width,
      self.depth,
      self.num_heads,
      self.mlp_ratio,
      self.dtype,
      self.attention_implementation,
      self.scan_blocks,
      name='encoder',
    )(x)
    coord_attention = lambda f: (
      CoordinateAttention(self.ca_reduction, dtype=self.dtype, name='coord_attention')(f, train)
      if self.use_coord_attention
      else f
    )
    if self.coord_attention_placement == 'before_memory':
      f = coord_attention(f)
    weights = None
    if self.use_memory:
      f, weights = Memory(self.num_memory, self.shrink_scale, self.memory_temperature, name='memory')(f)
      f = f.astype(self.dtype)
    if self.coord_attention_placement == 'after_memory':
      f = coord_attention(f)
    y = Decoder(
      tuple(self.decoder_channels),
      tuple(self.decoder_strides),
      self.out_channels,
      self.decoder_output,
      self.dtype,
      name='decoder',
    )(f, train)
    return (y + 1.0) / 2.0, weights


def network(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> ViTMemAE:
  return ViTMemAE(
    patch_size=cfg.patch_size,
    width=cfg.width,
    depth=cfg.depth,
    num_heads=cfg.num_heads,
    mlp_ratio=cfg.mlp_ratio,
    decoder_channels=tuple(cfg.decoder_channels),
    decoder_strides=tuple(cfg.decoder_strides),
    decoder_output=cfg.decoder_output,
    out_channels=ctx.channels,
    use_memory=cfg.use_memory,
    use_coord_attention=cfg.use_coord_attention,
    coord_attention_placement=cfg.coord_attention_placement,
    num_memory=cfg.num_memory,
    shrink_scale=cfg.shrink_scale,
    memory_temperature=cfg.memory_temperature,
    ca_reduction=cfg.ca_reduction,
    dtype=ctx.dtype,
    attention_implementation=ctx.attention_implementation,
    scan_blocks=cfg.scan_blocks,
  )


def reconstruct(net: ViTMemAE, state: optim.TrainState, images: jax.Array) -> jax.Array:
  """Inference-mode reconstruction (BatchNorm running statistics) in [0, 1]."""
  recon, _ = net.apply({'params': state.params, 'batch_stats': state.batch_stats}, images, train=False)
  return recon


def l2_loss(images: jax.Array, recon: jax.Array, channels: str) -> jax.Array:
  """Eq. 11, (1/WH) ||X - X_hat||^2 averaged over the batch; channels 'sum' (Eq. 11) or 'mean' (/ C)."""
  per_pixel = jnp.square(images.astype(jnp.float32) - recon.astype(jnp.float32))
  return jnp.mean(jnp.sum(per_pixel, axis=-1) if channels == 'sum' else jnp.mean(per_pixel, axis=-1))


def anomaly_maps(images: jax.Array, recon: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
  """Per-pixel Eq. 13 before smoothing: squared error (mean over channels) + w * (1 - SSIM)."""
  maps = losses.squared_error_map(images, recon)
  if cfg.map_ssim_weight:
    ssim = losses.ssim_map(images, recon, filter_size=cfg.ssim_filter_size, filter_sigma=cfg.ssim_sigma)
    maps = maps + cfg.map_ssim_weight * (1.0 - ssim)
  return maps


def build(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> AnomalyModel:
  image_size = ctx.image_size
  if image_size % cfg.patch_size:
    raise ValueError(f'image_size {image_size} is not a multiple of vit_memae.patch_size {cfg.patch_size}')
  if cfg.decoder_output not in DECODER_OUTPUTS:
    raise ValueError(f'vit_memae.decoder_output {cfg.decoder_output!r} is not one of {DECODER_OUTPUTS}')
  strides = tuple(cfg.decoder_strides)
  stages = len(cfg.decoder_channels) + (cfg.decoder_output == 'deconv')
  if len(strides) != stages or math.prod(strides) != cfg.patch_size:
    raise ValueError(
      f'vit_memae.decoder_strides {strides} must have one entry per decoder stage ({stages} with '
      f'decoder_output={cfg.decoder_output!r}) and multiply to patch_size {cfg.patch_size}'
    )
  if cfg.coord_attention_placement not in CA_PLACEMENTS:
    raise ValueError(
      f'vit_memae.coord_attention_placement {cfg.coord_attention_placement!r} is not one of {CA_PLACEMENTS}'
    )
  if cfg.l2_channels not in L2_CHANNELS:
    raise ValueError(f'vit_memae.l2_channels {cfg.l2_channels!r} is not one of {L2_CHANNELS}')
  net = network(cfg, ctx)
  tx = ctx.make_optimizer()
  ssim_kwargs = dict(filter_size=cfg.ssim_filter_size, filter_sigma=cfg.ssim_sigma)

  def init(rng, batch, frozen):
    del frozen
    variables = net.init(rng, batch['image'], train=False)
    return optim.TrainState.create(
      apply_fn=net.apply, params=variables['params'], tx=tx, batch_stats=variables['batch_stats']
    )

  def train_step(state, batch, rng, frozen):
    del rng, frozen
    images = batch['image']

    def loss_fn(params):
      (recon, weights), updates = net.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True, mutable=['batch_stats']
      )
      l2 = l2_loss(images, recon, cfg.l2_channels)  # Eq. 11
      ssim = losses.ssim_loss(images, recon, **ssim_kwargs)  # Eq. 12
      recon_loss = l2 + cfg.lambda_ssim * ssim  # Eq. 13
      parts = {'l2': l2, 'ssim_loss': ssim, 'recon_loss': recon_loss}
      loss = cfg.lambda_recon * recon_loss  # Eq. 15
      if weights is not None:
        ent = jnp.mean(losses.entropy(weights))  # Eq. 14, mean over queries
        loss = loss + cfg.lambda_ent * ent
        parts['entropy'] = ent
        parts['memory_active'] = jnp.mean(jnp.sum(weights > 0, axis=-1).astype(jnp.float32))
      return loss, (parts, updates['batch_stats'])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, norms = optim.apply_gradients(state, grads)
    return state.replace(batch_stats=batch_stats), {'loss': loss, **parts, **norms}

  def score(state, batch, frozen):
    del frozen
    images = batch['image']
    maps = anomaly_maps(images, reconstruct(net, state, images), cfg)
    maps = layers.gaussian_blur(maps, cfg.smoothing_sigma)
    return maps, jnp.max(maps, axis=(1, 2))

  return AnomalyModel(init=init, train_step=train_step, score=score)
