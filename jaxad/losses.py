"""Losses shared by reconstruction models: MSE, (block-)SSIM through dm-pix, entropy of weights.

Images are float [B, H, W, C]. SSIM is `dm_pix.ssim` (equal to skimage's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`), whose
Gaussian window is applied with a VALID convolution: `ssim_map(..., pad='reflect')` pads both images
by filter_size // 2 first, so the map has one value per input pixel (a window centred on each pixel).
"""

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean squared error over every element (torch's `MSELoss()`)."""
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def squared_error_map(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-pixel squared error averaged over channels: [B, H, W, C] -> [B, H, W]."""
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)


def _gaussian_1d(filter_size: int, filter_sigma: float) -> np.ndarray:
  """dm-pix's SSIM window (same centring for even sizes)."""
  hw = filter_size // 2
  shift = (2 * hw - filter_size + 1) / 2
  f = np.exp(-0.5 * ((np.arange(filter_size) - hw + shift) / filter_sigma) ** 2)
  return f / f.sum()


def _band(n: int, taps: np.ndarray) -> np.ndarray:
  """[n - len(taps) + 1, n] matrix whose product with a signal is the VALID correlation with taps."""
  out = np.zeros((n - len(taps) + 1, n), np.float32)
  for i in range(out.shape[0]):
    out[i, i : i + len(taps)] = taps
  return out


def banded_gaussian_filter(filter_size: int, filter_sigma: float):
  """A `filter_fn` for dm_pix.ssim: its separable VALID Gaussian blur of [..., H, W, C] as two matmuls.

  Same result as dm-pix's default (vmapped jnp.convolve) to float32 rounding, ~6x faster to
  differentiate on CPU.
  """
  taps = _gaussian_1d(filter_size, filter_sigma)

  def filter_fn(z):
    rows = jnp.asarray(_band(z.shape[-3], taps))
    cols = jnp.asarray(_band(z.shape[-2], taps))
    z = jnp.einsum('oh,...hwc->...owc', rows, z, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum('ow,...hwc->...hoc', cols, z, precision=jax.lax.Precision.HIGHEST)

  return filter_fn


def ssim_map(
  a: jax.Array,
  b: jax.Array,
  *,
  max_val: float = 1.0,
  filter_size: int = 11,
  filter_sigma: float = 1.5,
  pad: str | None = 'reflect',
  k1: float = 0.01,
  k2: float = 0.03,
) -> jax.Array:
  """Local SSIM of two image batches [B, H, W, C], averaged over channels: [B, H', W'].

  pad: a `jnp.pad` mode ('reflect', 'symmetric', 'edge', ...) applied to both images before the
  VALID filtering, so H' = H and W' = W; None keeps dm-pix's VALID map (H' = H - filter_size + 1).
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  if pad:
    r = filter_size // 2
    widths = ((0, 0), (r, filter_size - 1 - r), (r, filter_size - 1 - r), (0, 0))
    a, b = jnp.pad(a, widths, mode=pad), jnp.pad(b, widths, mode=pad)
  out = dm_pix.ssim(
    a,
    b,
    max_val=max_val,
    filter_size=filter_size,
    filter_sigma=filter_sigma,
    k1=k1,
    k2=k2,
    return_map=True,
    filter_fn=banded_gaussian_filter(filter_size, filter_sigma),
  )
  return jnp.mean(out, axis=-1)


def ssim_loss(a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
  """Block-SSIM loss: the mean over window centres (i, j) of 1 - SSIM(a, b)(i, j).

  With the default reflect padding every pixel is a window centre (the 1/(WH) sum of
  AnoViT / ViT-Mem-CA Eq. 12). Keyword arguments go to `ssim_map`.
  """
  return jnp.mean(1.0 - ssim_map(a, b, **kwargs))


def entropy(p: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Shannon entropy -sum p log p along `axis` (zeros contribute 0; p need not be strictly > 0)."""
  p = p.astype(jnp.float32)
  return -jnp.sum(p * jnp.log(p + eps), axis=axis)
