"""ToMe token merging: identity at r=0, exactly r tokens fewer per block, size-weighted mean preserved,
proportional attention, and agreement with a direct (loop) implementation of bipartite soft matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.models import layers, tome


def _tokens(b=2, n=16, c=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, n, c))


def test_r0_is_identity():
  x = _tokens()
  merge = tome.bipartite_soft_matching(x, 0)
  assert merge(x) is x
  size = jnp.ones(x.shape[:2])
  y, s = tome.merge_wavg(merge, x, size)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(s, size)


def test_r0_block_equals_layers_block_with_the_same_parameters():
  x = _tokens()
  params = layers.Block(4).init(jax.random.key(1), x)
  tome_params = tome.ToMeBlock(4, r=0).init(jax.random.key(1), x, jnp.ones(x.shape[:2]))
  assert jax.tree.structure(params) == jax.tree.structure(tome_params)
  want = layers.Block(4).apply(params, x)
  got, size = tome.ToMeBlock(4, r=0).apply(params, x, jnp.ones(x.shape[:2]))
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_array_equal(size, 1.0)


@pytest.mark.parametrize('r', [1, 2, 3])
def test_blocks_remove_exactly_r_tokens_each_and_keep_static_shapes_under_jit(r):
  n, depth = 24, 4
  x = _tokens(n=n)
  blocks = [tome.ToMeBlock(4, r=r, name=f'b{i}') for i in range(depth)]
  size = jnp.ones(x.shape[:2])
  params = []
  for blk in blocks:
    p = jax.jit(blk.init)(jax.random.key(len(params)), x, size)
    params.append(p)
    x, size = jax.jit(blk.apply)(p, x, size)
    assert x.shape == (2, n - r * len(params), 32)
    assert size.shape == (2, n - r * len(params))
    np.testing.assert_allclose(size.sum(axis=1), n)  # Every input patch is still counted once.
  assert tome.token_counts(n, r, depth) == [n - r * i for i in range(depth + 1)]
  assert tome.token_counts(6, 4, 3) == [6, 3, 2, 1]  # r is clamped to half the tokens.


@pytest.mark.parametrize('r', [1, 4, 8])
def test_merge_wavg_preserves_size_weighted_mean_and_total_size(r):
  x = _tokens(n=16, seed=3)
  size = jax.random.randint(jax.random.key(4), x.shape[:2], 1, 5).astype(jnp.float32)
  merge = tome.bipartite_soft_matching(_tokens(n=16, seed=5), r)
  y, s = tome.merge_wavg(merge, x, size)
  assert y.shape == (2, 16 - r, 32) and s.shape == (2, 16 - r)
  mean = lambda t, w: jnp.sum(t * w[..., None], axis=1) / jnp.sum(w, axis=1, keepdims=True)
  np.testing.assert_allclose(mean(y, s), mean(x, size), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.sum(axis=1), size.sum(axis=1))


def _reference_merge(metric, x, size, r):
  """Direct loops over one batch element: A = even tokens, B = odd tokens; the r A-tokens with the
  highest cosine similarity to their best B partner are averaged (size-weighted) into it."""
  metric = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  a_idx, b_idx = list(range(0, len(x), 2)), list(range(1, len(x), 2))
  best = {i: max(b_idx, key=lambda j: metric[i] @ metric[j]) for i in a_idx}
  sim = {i: metric[i] @ metric[best[i]] for i in a_idx}
  merged = sorted(a_idx, key=lambda i: -sim[i])[:r]
  kept = sorted((i for i in a_idx if i not in merged), key=lambda i: -sim[i])
  tokens, sizes = [], []
  for i in kept:
    tokens.append(x[i])
    sizes.append(size[i])
  for j in b_idx:
    group = [j] + [i for i in merged if best[i] == j]
    w = np.array([size[k] for k in group])
    tokens.append(sum(x[k] * size[k] for k in group) / w.sum())
    sizes.append(w.sum())
  return np.stack(tokens), np.array(sizes)


def test_matches_direct_implementation():
  metric = np.asarray(_tokens(b=3, n=14, c=8, seed=6), np.float64)
  x = np.asarray(_tokens(b=3, n=14, c=5, seed=7))
  size = np.asarray(jax.random.randint(jax.random.key(8), (3, 14), 1, 4), np.float32)
  merge = tome.bipartite_soft_matching(jnp.asarray(metric, jnp.float32), 3)
  y, s = tome.merge_wavg(merge, jnp.asarray(x), jnp.asarray(size))
  for i in range(3):
    want_x, want_s = _reference_merge(metric[i], x[i], size[i], 3)
    np.testing.assert_allclose(y[i], want_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s[i], want_s)


def test_proportional_attention_equals_attention_over_duplicated_tokens():
  """A token of size 2 draws as much attention as two identical copies of it (log(size) bias)."""
  x = _tokens(b=1, n=6, c=16, seed=9)
  attn = layers.Attention(2)
  params = attn.init(jax.random.key(10), x)
  size = jnp.array([[2.0, 1, 1, 1, 1, 1]])
  got = attn.apply(params, x, size)
  dup = jnp.concatenate([x[:, :1], x], axis=1)
  want = layers.Attention(2).apply(params, dup)[:, 1:]
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_metric_is_the_head_averaged_keys():
  x = _tokens(b=1, n=4, c=16, seed=11)
  attn = layers.Attention(4)
  params = attn.init(jax.random.key(12), x)
  _, metric = attn.apply(params, x, return_keys=True)
  k = jnp.einsum('bnc,chd->bnhd', x, params['params']['key']['kernel']) + params['params']['key']['bias']
  np.testing.assert_allclose(metric, k.mean(axis=2), atol=1e-5)
