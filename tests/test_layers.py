"""Shared layers against independent references (scipy), and SIVT's induction partition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxad.models import layers, sivt


@pytest.mark.parametrize('sigma', [1.0, 2.5, 4.0])
def test_gaussian_blur_matches_scipy(sigma):
  maps = np.random.default_rng(0).random((3, 40, 33)).astype(np.float32)
  ours = np.asarray(layers.gaussian_blur(jnp.asarray(maps), sigma))
  ref = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma, mode='reflect') for m in maps])
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_sincos_embedding_is_distinct_per_position():
  emb = layers.sincos_pos_embed_2d(8, 8, 64)
  assert emb.shape == (64, 64)
  dists = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
  assert np.all(dists[~np.eye(64, dtype=bool)] > 1e-3)


def test_random_partition_is_equal_disjoint_and_fresh():
  a = np.asarray(sivt.random_partition(jax.random.key(0), 64, 4))
  b = np.asarray(sivt.random_partition(jax.random.key(1), 64, 4))
  assert sorted(np.bincount(a, minlength=4)) == [16] * 4
  assert not np.array_equal(a, b)


def _tiny_net():
  return sivt.SelfInductionViT(
    patch_size=2, num_subsets=4, width=32, encoder_depth=1, decoder_depth=1, num_heads=4
  )


def test_sivt_reconstruction_shape():
  net = _tiny_net()
  feats = jnp.ones((2, 8, 8, 5))
  part = sivt.random_partition(jax.random.key(0), 16, 4)
  params = jax.jit(net.init)(jax.random.key(1), feats, part)
  assert jax.jit(net.apply)(params, feats, part).shape == (2, 8, 8, 5)


def test_induction_tokens_never_see_their_own_subset():
  """Z_X* at the tokens of subset i depends only on the original tokens outside subset i (Eq. 1)."""
  net = _tiny_net()
  feats = jax.random.normal(jax.random.key(2), (1, 8, 8, 3))
  part = sivt.random_partition(jax.random.key(3), 16, 4)
  params = jax.jit(net.init)(jax.random.key(4), feats, part)

  def latent(f):
    _, state = net.apply(params, f, part, mutable=['intermediates'])
    return state['intermediates']['induction_latent'][0][0]  # [L, D]

  # Eager on purpose: on XLA CPU (jaxlib 0.10.2) jit(jacrev(f)) is wrong for a plain layer norm f on
  # a [4, 16, 32] input (0.045 off finite differences; eager, jit(jacfwd), jit(grad) and
  # jit(vmap(grad)) are right), and here it differed from this Jacobian by up to 0.16.
  jac = jax.jacrev(latent)(feats)[:, :, 0]  # [L, D, 8, 8, C]
  token_of_pixel = (np.arange(8)[:, None] // 2) * 4 + np.arange(8)[None] // 2
  part = np.asarray(part)
  for t in range(16):
    same_subset_pixels = part[token_of_pixel] == part[t]
    assert np.abs(np.asarray(jac[t])[:, same_subset_pixels]).max() == 0.0
    assert np.abs(np.asarray(jac[t])[:, ~same_subset_pixels]).max() > 0.0
