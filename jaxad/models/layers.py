"""Layers shared by several models: ViT blocks, positional embeddings, map smoothing and resizing."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sincos_pos_embed_2d(height: int, width: int, dim: int) -> np.ndarray:
  """Fixed 2D sine-cosine position embedding [height*width, dim] (as in MAE)."""
  if dim % 4:
    raise ValueError(f'sincos embedding needs a width divisible by 4, got {dim}')
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  ys, xs = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing='ij')
  out = []
  for pos in (ys.reshape(-1), xs.reshape(-1)):
    angles = pos[:, None] * omega[None]
    out += [np.sin(angles), np.cos(angles)]
  return np.concatenate(out, axis=1).astype(np.float32)


class Mlp(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(out, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)


class Attention(nn.Module):
  """Multi-head self-attention through `jax.nn.dot_product_attention` (fused where available).

  `implementation`: None lets XLA pick, 'xla' or 'cudnn' force one (cuDNN's fused kernel needs a head
  dim that is a multiple of 8 and float16/bfloat16 inputs).
  """

  num_heads: int
  dtype: jnp.dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x, key_size=None, return_keys=False):
    """key_size [B, N] (ToMe's proportional attention): log(size) is added to every query's logit
    for each key. return_keys: also return the keys averaged over heads, [B, N, head_dim]."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())
    q, k, v = (dense((self.num_heads, head_dim), name=n)(x) for n in ('query', 'key', 'value'))
    bias = None if key_size is None else jnp.log(key_size).astype(q.dtype)[:, None, None, :]
    y = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=self.implementation)
    y = dense(width, axis=(-2, -1), name='out')(y)
    return (y, jnp.mean(k, axis=2)) if return_keys else y


class Block(nn.Module):
  """Pre-norm Transformer block: x + MHSA(LN(x)); x + MLP(LN(x))."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None  # See Attention.implementation.

  @nn.compact
  def __call__(self, x):
    attn = Attention(self.num_heads, self.dtype, self.attention_implementation)
    x = x + attn(nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x))
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + Mlp(hidden, self.dtype)(nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x))


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], row-major patches.

  The order of a stride-p Conv patch embedding.
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, gh: int, gw: int, p: int, c: int) -> jax.Array:
  """Inverse of `patchify`: [B, gh*gw, p*p*C] -> [B, gh*p, gw*p, C]."""
  b = x.shape[0]
  x = x.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, c)


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """The 1-D kernel scipy.ndimage.gaussian_filter uses (radius = int(truncate * sigma + 0.5))."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian smoothing of [B, H, W] maps with 'reflect' borders (scipy's default)."""
  if sigma <= 0:
    return maps
  kernel = jnp.asarray(gaussian_kernel_1d(sigma))
  radius = kernel.shape[0] // 2
  x = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius)), mode='symmetric')
  x = x[..., None]
  x = jax.lax.conv_general_dilated(
    x, kernel.reshape(-1, 1, 1, 1), (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  x = jax.lax.conv_general_dilated(
    x, kernel.reshape(1, -1, 1, 1), (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  return x[..., 0]


def resize_maps(maps: jax.Array, size: int) -> jax.Array:
  """Bilinear resize of [B, h, w] maps to [B, size, size]."""
  return jax.image.resize(maps, (maps.shape[0], size, size), method='linear')


# Memory and coordinate attention (first used by ViT-Mem-CA, jaxad/models/vit_memae.py).
from typing import Callable  # noqa: E402  (kept with the layers that use it)


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
