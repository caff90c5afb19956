"""SIVT: self-induction vision Transformer over frozen CNN features.

Yao and Yu, "Generalizable Industrial Visual Anomaly Detection with Self-Induction Vision Transformer",
arXiv:2211.12311, 2022. Results and deviations: docs/models/sivt.md.

Pipeline (Fig. 2, Algorithm 1): a frozen ImageNet CNN gives multi-scale maps, resized to one size and
concatenated into F [H, W, C]; F is embedded into L patch tokens X; a learnable induction sequence X*
(same size) is split into N disjoint subsets; sequence Phi_i takes the tokens of subset i from X* and
all others from X (Eq. 1); a shared encoder encodes every Phi_i, only the induction tokens are kept and
reassembled into Z_X*, and a decoder reconstructs F. Loss Eq. 2, anomaly map Eq. 3.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state

from jaxad import optim
from jaxad.models import AnomalyModel, ModelContext, layers

# Config fields of the `sivt` block that only change scoring: a finished run may be rescored with
# other values (jaxad.provenance).
SCORING_FIELDS = ('smoothing_sigma', 'test_partition_seed', 'test_partitions', 'image_score_map')
# Config fields that change the parameter layout, with the value a record without them implies: a run
# is only resumed or loaded with the layout its checkpoints have (jaxad.provenance).
LAYOUT_FIELDS = {'scan_blocks': False}
# Config fields added after runs were recorded, with the value a record without them implies
# (jaxad.provenance.implied_fields).
ADDED_FIELDS = {'image_score_map': 'smoothed'}


class SelfInductionViT(nn.Module):
  """Reconstructs features F [B, H, W, C] given a partition of the L tokens into N subsets."""

  patch_size: int
  num_subsets: int
  width: int
  encoder_depth: int
  decoder_depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None  # layers.Attention.implementation.
  scan_blocks: bool = False  # layers.repeat_blocks: each stack's block compiled once.

  def blocks(self, depth: int, name: str):
    block = lambda n: layers.Block(
      self.num_heads, self.mlp_ratio, self.dtype, self.attention_implementation, name=n
    )
    return layers.repeat_blocks(block, depth, self.scan_blocks, name)

  @nn.compact
  def __call__(self, features: jax.Array, partition: jax.Array) -> jax.Array:
    b, h, w, c = features.shape
    p = self.patch_size
    gh, gw = h // p, w // p
    num_tokens = gh * gw
    pos = jnp.asarray(layers.sincos_pos_embed_2d(gh, gw, self.width))

    # Algorithm 1, line 1: X = E(F, P).
    x = (
      nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='patch_embed')(
        features
      ).reshape(b, num_tokens, self.width)
      + pos
    )
    # Lines 2-6: Phi_i = X*_i U C_X X*_i  (Eq. 1).
    induction = self.param('induction_tokens', nn.initializers.normal(0.02), (num_tokens, self.width)) + pos
    member = jnp.arange(self.num_subsets)[:, None] == partition[None, :]  # [N, L]: token l is in subset i.
    phi = jnp.where(member[:, None, :, None], induction.astype(x.dtype), x[None])
    # Line 7: encode every Phi_i with one shared encoder.
    z = phi.reshape(self.num_subsets * b, num_tokens, self.width)
    z = self.blocks(self.encoder_depth, 'encoder')(z)
    z = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='encoder_norm')(z)
    z = z.reshape(self.num_subsets, b, num_tokens, self.width)
    # Lines 8-10: keep the induction tokens of each Phi_i and reassemble Z_X*.
    z_star = jnp.sum(jnp.where(member[:, None, :, None], z, 0), axis=0)
    self.sow('intermediates', 'induction_latent', z_star)
    # Line 11: F~ = Dec(Z_X*).
    y = nn.Dense(self.width, dtype=self.dtype, name='decoder_embed')(z_star) + pos
    y = self.blocks(self.decoder_depth, 'decoder')(y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='decoder_norm')(y)
    y = nn.Dense(p * p * c, dtype=self.dtype, name='decoder_pred')(y)
    y = layers.unpatchify(y, gh, gw, p, c)
    return y.astype(jnp.float32)


def random_partition(rng: jax.Array, num_tokens: int, num_subsets: int) -> jax.Array:
  """Subset id in [0, N) of each token: a uniformly random split into N equal, disjoint subsets."""
  perm = jax.random.permutation(rng, num_tokens)
  return jnp.zeros(num_tokens, jnp.int32).at[perm].set(jnp.arange(num_tokens) // (num_tokens // num_subsets))


def residuals(features: jax.Array, recon: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-position squared L2 distance and 1 - cosine similarity over channels (Eq. 2-3)."""
  sq = jnp.sum((features - recon) ** 2, axis=-1)
  cos = jnp.sum(features * recon, -1) / (
    jnp.linalg.norm(features, axis=-1) * jnp.linalg.norm(recon, axis=-1) + 1e-8
  )
  return sq, 1.0 - cos


def build(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> AnomalyModel:
  extractor = ctx.backbone
  if extractor is None:
    raise ValueError(
      'sivt reconstructs frozen CNN features: set config.backbone.arch (tf_efficientnet_lite0).'
    )
  feature_size = cfg.feature_size
  if feature_size % cfg.patch_size:
    raise ValueError(f'sivt.feature_size {feature_size} is not a multiple of patch_size {cfg.patch_size}')
  num_tokens = (feature_size // cfg.patch_size) ** 2
  if num_tokens % cfg.num_subsets:
    raise ValueError(f'{num_tokens} tokens cannot be split into {cfg.num_subsets} equal subsets')
  net = SelfInductionViT(
    cfg.patch_size,
    cfg.num_subsets,
    cfg.width,
    cfg.encoder_depth,
    cfg.decoder_depth,
    cfg.num_heads,
    cfg.mlp_ratio,
    ctx.dtype,
    attention_implementation=ctx.attention_implementation,
    scan_blocks=cfg.scan_blocks,
  )
  tx = ctx.make_optimizer()
  test_keys = jax.random.split(jax.random.key(cfg.test_partition_seed), cfg.test_partitions)
  test_partitions = [random_partition(k, num_tokens, cfg.num_subsets) for k in test_keys]
  image_size = ctx.image_size
  image_score_map = cfg.image_score_map
  if image_score_map not in ('smoothed', 'eq3'):
    raise ValueError(f"sivt.image_score_map must be 'smoothed' or 'eq3', got {image_score_map!r}")

  def precompute(batch, frozen):
    """F: backbone maps resized to feature_size and concatenated over channels (Sec. III-B)."""
    maps = extractor.apply_fn(frozen['backbone'], batch['image'])
    maps = [layers.resize(m, (feature_size, feature_size)) for m in maps]
    return {'features': jnp.concatenate(maps, axis=-1)}

  def features_of(batch, frozen):
    return batch['features'] if 'features' in batch else precompute(batch, frozen)['features']

  def init(rng, batch, frozen):
    params = net.init(rng, features_of(batch, frozen), test_partitions[0])['params']
    return train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)

  def train_step(state, batch, rng, frozen):
    features = features_of(batch, frozen)
    partition = random_partition(rng, num_tokens, cfg.num_subsets)  # Fresh split every step.

    def loss_fn(params):
      recon = net.apply({'params': params}, features, partition)
      sq, one_minus_cos = residuals(features, recon)
      l2, cos_term = sq.mean(), one_minus_cos.mean()
      return l2 + cfg.cosine_weight * cos_term, {'l2': l2, 'cosine': cos_term}

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, norms = optim.apply_gradients(state, grads)
    return state, {'loss': loss, **parts, **norms}

  def score(state, batch, frozen):
    features = features_of(batch, frozen)
    a = 0.0  # Eq. 3's map A [B, feature_size, feature_size].
    for partition in test_partitions:  # Fixed, seeded partitions; their Eq. 3 maps are averaged.
      sq, one_minus_cos = residuals(features, net.apply({'params': state.params}, features, partition))
      a += sq * one_minus_cos / len(test_partitions)
    maps = layers.gaussian_blur(layers.resize_maps(a, image_size), cfg.smoothing_sigma)
    scored = a if image_score_map == 'eq3' else maps
    return maps, jnp.std(scored, axis=(1, 2))

  return AnomalyModel(
    init=init,
    train_step=train_step,
    score=score,
    frozen={'backbone': extractor.params},
    precompute=precompute,
    cached_keys=('features',),
  )
