"""ViT-Mem-CA: ViT autoencoder with a memory module and coordinate attention.

Paper: vit_memory_coordinate_attention_ae.txt (Sensors 24, 2440, 2024). Pipeline (Fig. 2, Sec. 3):
  X in [0, 1] -> scaled to [-1, 1] -> ViT encoder (patch embedding, [cls] token, learned position
  embedding E_pos in R^{(N+1) x D}, pre-norm blocks; Eq. 4-6) -> the N patch embeddings rearranged into
  a feature map F [H/P, W/P, D] (the [cls] output is dropped) -> memory module: every spatial feature z
  is replaced by w_hat M, cosine addressing + softmax, hard shrinkage at 1/N, L1 renormalisation
  (Eq. 7-10) -> coordinate attention (Sec. 3.3) -> decoder: six transposed-conv stages with BatchNorm
  + ReLU (strides multiply to P: H/P -> H), then a 3x3 conv to the image channels and tanh (Sec. 3.4).
  The tanh output in [-1, 1] is mapped back to [0, 1]: every loss and map is in input units.

Loss (Eq. 11-15): lambda_recon * (L2 + lambda_ssim * block-SSIM) + lambda_ent * entropy(w_hat).
Anomaly map: the per-pixel form of the reconstruction loss, squared error (mean over channels) +
map_ssim_weight * (1 - SSIM) (Sec. 1, contribution 4: L2 and SSIM "calculate the anomaly score"),
smoothed with a Gaussian (Sec. 4.2); image score = max of the map (the paper does not say).

Ablation (Table 6): config.vit_memae.use_memory / use_coord_attention (base, +M, +CA, +M+CA).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxad import losses, models, optim
from jaxad.models import AnomalyModel, layers


class ViTEncoder(nn.Module):
  """ViT encoder (Eq. 4-6): returns the patch embeddings as a map [B, H/P, W/P, D] and the [cls] output."""

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None  # layers.Attention.implementation.

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
    for i in range(self.depth):
      z = layers.Block(
        self.num_heads, self.mlp_ratio, self.dtype, self.attention_implementation, name=f'block_{i}'
      )(z)
    z = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(z)
    return z[:, 1:].reshape(b, gh, gw, self.width), z[:, 0]


class Decoder(nn.Module):
  """Transposed-conv stages (BN + ReLU each; stride 2: 4x4 kernel, stride 1: 3x3), then conv + tanh."""

  channels: tuple[int, ...]
  strides: tuple[int, ...]
  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, (c, s) in enumerate(zip(self.channels, self.strides)):
      k = 4 if s == 2 else 3
      # = nn.ConvTranspose(c, (k, k), strides=(s, s), padding='SAME'), fast on CPU too.
      x = layers.SubpixelConvTranspose(c, k, s, use_bias=False, dtype=self.dtype, name=f'deconv_{i}')(x)
      x = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=f'bn_{i}'
      )(x)
      x = nn.relu(x)
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
  out_channels: int = 3
  use_memory: bool = True
  use_coord_attention: bool = True
  num_memory: int = 100
  shrink_scale: float = 1.0
  memory_temperature: float = 1.0
  ca_reduction: int = 32
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None  # layers.Attention.implementation.

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
      name='encoder',
    )(x)
    weights = None
    if self.use_memory:
      f, weights = layers.Memory(self.num_memory, self.shrink_scale, self.memory_temperature, name='memory')(
        f
      )
      f = f.astype(self.dtype)
    if self.use_coord_attention:
      f = layers.CoordinateAttention(self.ca_reduction, dtype=self.dtype, name='coord_attention')(f, train)
    y = Decoder(
      tuple(self.decoder_channels), tuple(self.decoder_strides), self.out_channels, self.dtype, name='decoder'
    )(f, train)
    return (y + 1.0) / 2.0, weights


def network(config: ml_collections.ConfigDict) -> ViTMemAE:
  cfg = config.vit_memae
  return ViTMemAE(
    patch_size=cfg.patch_size,
    width=cfg.width,
    depth=cfg.depth,
    num_heads=cfg.num_heads,
    mlp_ratio=cfg.mlp_ratio,
    decoder_channels=tuple(cfg.decoder_channels),
    decoder_strides=tuple(cfg.decoder_strides),
    out_channels=config.dataset.channels,
    use_memory=cfg.use_memory,
    use_coord_attention=cfg.use_coord_attention,
    num_memory=cfg.num_memory,
    shrink_scale=cfg.shrink_scale,
    memory_temperature=cfg.memory_temperature,
    ca_reduction=cfg.ca_reduction,
    dtype=models.compute_dtype(config.dtype),
    attention_implementation=config.attention_implementation,
  )


def reconstruct(net: ViTMemAE, state: optim.TrainState, images: jax.Array) -> jax.Array:
  """Inference-mode reconstruction (BatchNorm running statistics) in [0, 1]."""
  recon, _ = net.apply({'params': state.params, 'batch_stats': state.batch_stats}, images, train=False)
  return recon


def anomaly_maps(images: jax.Array, recon: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
  """Per-pixel Eq. 13 before smoothing: squared error (mean over channels) + w * (1 - SSIM)."""
  maps = losses.squared_error_map(images, recon)
  if cfg.map_ssim_weight:
    ssim = losses.ssim_map(images, recon, filter_size=cfg.ssim_filter_size, filter_sigma=cfg.ssim_sigma)
    maps = maps + cfg.map_ssim_weight * (1.0 - ssim)
  return maps


def build(config: ml_collections.ConfigDict, total_steps: int) -> AnomalyModel:
  cfg = config.vit_memae
  image_size = config.dataset.image_size
  if image_size % cfg.patch_size:
    raise ValueError(f'image_size {image_size} is not a multiple of vit_memae.patch_size {cfg.patch_size}')
  strides = tuple(cfg.decoder_strides)
  if len(strides) != len(cfg.decoder_channels) or math.prod(strides) != cfg.patch_size:
    raise ValueError(
      f'vit_memae.decoder_strides {strides} must have one entry per decoder stage '
      f'({len(cfg.decoder_channels)}) and multiply to patch_size {cfg.patch_size}'
    )
  net = network(config)
  tx = optim.make_optimizer(config.optimizer, total_steps)
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
      l2 = losses.mse(images, recon)  # Eq. 11
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
