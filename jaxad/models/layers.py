"""Layers shared by several models: ViT blocks, positional embeddings, map smoothing and resizing."""

import functools
import re
from typing import Any, Callable

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


def repeat_blocks(
  make_block: Callable[[str], nn.Module],
  depth: int,
  scan: bool,
  name: str,
  input_offset: jax.Array | None = None,
) -> Callable[[jax.Array], jax.Array]:
  """x -> `depth` blocks `make_block(name)` (each x -> x, params only) applied in turn.

  `input_offset` (broadcastable to x), if given, is added to every block's input (e.g. a position
  embedding added in every layer). Call inside a compact `__call__`. Unrolled (`scan=False`): the blocks
  are submodules `{name}_{i}`. Scanned: one submodule `name` whose params carry a leading axis of size
  `depth`, applied by `nn.scan`, so XLA compiles the block once instead of `depth` times
  (`stack_block_params` maps the unrolled params onto this layout).
  """
  shift = (lambda x: x) if input_offset is None else (lambda x: x + input_offset)
  if not scan:
    blocks = [make_block(f'{name}_{i}') for i in range(depth)]
    return lambda x: functools.reduce(lambda y, block: block(shift(y)), blocks, x)
  if depth == 0:
    return lambda x: x
  body = nn.scan(
    lambda block, x, _: (block(shift(x)), None),
    variable_axes={'params': 0},
    split_rngs={'params': True},
    length=depth,
  )
  block = make_block(name)
  return lambda x: body(block, x, None)[0]


def stack_block_params(params: Any, name: str) -> Any:
  """Unrolled params (`{name}_0` ... `{name}_{n-1}` at any depth of the tree) in the scanned layout of
  `repeat_blocks`: one entry `name` holding each leaf stacked along a new leading axis."""
  if not isinstance(params, dict):
    return params
  pattern = re.compile(rf'{re.escape(name)}_(\d+)')
  numbered = {int(m.group(1)): v for k, v in params.items() if (m := pattern.fullmatch(k))}
  out = {k: stack_block_params(v, name) for k, v in params.items() if not pattern.fullmatch(k)}
  if numbered:
    if sorted(numbered) != list(range(len(numbered))):
      raise ValueError(f'{name}_<i> blocks {sorted(numbered)} are not numbered 0 ... n-1')
    out[name] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(numbered[i] for i in range(len(numbered))))
  return out


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


# Bound at import: jax2onnx replaces the attribute `jax.image.resize` while it converts with a primitive of
# its own that needs a constant batch size, while this function, traced op by op, keeps it symbolic.
_jax_resize = jax.image.resize


def resize(
  x: jax.Array, spatial: tuple[int, ...], method: str = 'linear', antialias: bool = True
) -> jax.Array:
  """jax.image.resize of the dimensions after the batch to `spatial` + the trailing ones left as they are."""
  shape = (x.shape[0], *spatial, *x.shape[1 + len(spatial) :])
  return _jax_resize(x, shape, method=method, antialias=antialias)


def resize_maps(maps: jax.Array, size: int) -> jax.Array:
  """Bilinear resize of [B, h, w] maps to [B, size, size]."""
  return resize(maps, (size, size))
