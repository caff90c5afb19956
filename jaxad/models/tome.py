"""Token merging (ToMe, Bolya et al., ICLR 2023) for ViT blocks, with static shapes under jit.

Algorithm (after facebookresearch/ToMe, reimplemented): in every block, after attention, the tokens
are split alternately into two sets A (even positions) and B (odd positions); each token of A is
matched to its most similar token of B by the cosine similarity of the attention keys (averaged over
heads); the r A-tokens with the most similar matches are merged into their B partners by a
size-weighted average, and every other token is kept. Each token carries its size (how many input
patches it stands for); attention adds log(size) to the logits of each key ("proportional
attention"), so a merged token pulls as much attention as the tokens it replaces.

Shapes stay static: r is a Python int fixed per block, so a block maps N tokens to N - r
(r is clamped to N // 2, as in ToMe). With r = 0 a block is exactly `layers.Block`.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxad.models import layers


def _identity(x: jax.Array, mode: str = 'sum') -> jax.Array:
  del mode
  return x


def bipartite_soft_matching(metric: jax.Array, r: int) -> Callable[..., jax.Array]:
  """Matches tokens of metric [B, N, C] and returns `merge(x, mode)` : [B, N, ...] -> [B, N - r, ...].

  The merged sequence is (kept A tokens in order of decreasing best-match similarity, then all
  B tokens with the merged A tokens reduced into them); mode 'sum' adds, 'mean' averages a B token
  with the A tokens merged into it. The matching uses no gradient (indices only).
  """
  n = metric.shape[1]
  r = min(int(r), n // 2)
  if r <= 0:
    return _identity
  metric = jax.lax.stop_gradient(metric.astype(jnp.float32))
  metric = metric / jnp.maximum(jnp.linalg.norm(metric, axis=-1, keepdims=True), 1e-12)
  a, b = metric[:, ::2], metric[:, 1::2]
  scores = jnp.einsum('bic,bjc->bij', a, b, precision=jax.lax.Precision.HIGHEST)
  node_max = jnp.max(scores, axis=-1)  # [B, Na]: best similarity of each A token
  node_idx = jnp.argmax(scores, axis=-1)  # [B, Na]: its partner in B
  order = jnp.argsort(-node_max, axis=-1)  # A tokens, most similar first
  unm_idx, src_idx = order[:, r:], order[:, :r]
  dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=1)  # [B, r]
  batch = jnp.arange(metric.shape[0])[:, None]

  def merge(x: jax.Array, mode: str = 'sum') -> jax.Array:
    if x.shape[1] != n:
      raise ValueError(f'merge expects {n} tokens, got shape {x.shape}')
    src, dst = x[:, ::2], x[:, 1::2]
    expand = lambda idx: idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    unm = jnp.take_along_axis(src, expand(unm_idx), axis=1)
    src = jnp.take_along_axis(src, expand(src_idx), axis=1)
    if mode == 'sum':
      dst = dst.at[batch, dst_idx].add(src)
    elif mode == 'mean':
      count = jnp.ones(dst.shape[:2], x.dtype).at[batch, dst_idx].add(1.0)
      dst = dst.at[batch, dst_idx].add(src) / count.reshape(count.shape + (1,) * (x.ndim - 2))
    else:
      raise ValueError(f'Unknown merge mode {mode!r}; expected "sum" or "mean".')
    return jnp.concatenate([unm, dst], axis=1)

  return merge


def merge_wavg(merge: Callable[..., jax.Array], x: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Size-weighted average merge of tokens x [B, N, C] with sizes [B, N] -> ([B, N', C], [B, N'])."""
  summed = merge(x * size[..., None].astype(x.dtype), 'sum')
  size = merge(size, 'sum')
  return summed / size[..., None].astype(x.dtype), size


class ToMeBlock(nn.Module):
  """Pre-norm Transformer block with ToMe between attention and MLP (as ToMe's timm patch).

  (x [B, N, C], size [B, N]) -> (x [B, N - r, C], size [B, N - r]). Parameter names equal
  `layers.Block`'s, so a trained Block's parameters load here unchanged.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  r: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_0')(x)
    attn, metric = layers.Attention(self.num_heads, self.dtype, name='Attention_0')(
      h, key_size=size, return_keys=True
    )
    x = x + attn
    if self.r > 0:
      merge = bipartite_soft_matching(metric, self.r)
      x, size = merge_wavg(merge, x, size)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_1')(x)
    return x + layers.Mlp(hidden, self.dtype, name='Mlp_0')(h), size


def token_counts(num_tokens: int, r: int, depth: int) -> list[int]:
  """Tokens entering each block and after the last: [N, N - r, ..., N - r * depth] (clamped)."""
  counts = [num_tokens]
  for _ in range(depth):
    counts.append(counts[-1] - min(r, counts[-1] // 2))
  return counts
