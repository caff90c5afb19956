"""TMIRN: Transformer-based multi-scale reconstruction GAN.

Wei et al., "Transformer-based Multi-scale Reconstruction Network for Defect Detection of Infrared
Images", IEEE TIM 2024. Results and deviations: docs/models/tmirn.md.

Sizes below are for an input of S = 224 (the paper's); every size scales with S (a multiple of 32) and
every width with `base_width` (the paper's 32).

* Multi-scale input (Sec. III-A): large S, medium S/2, small S/4 (bilinear resizes of the image).
* MTFE (Sec. III-B, Eq. 1-8): per scale a stack of layers, each a residual conv block (two 3x3
  convs, the first of stride 2, + a stride-2 1x1 skip, BatchNorm, LeakyReLU; Eq. 1) followed by a
  light ViT module (`vit_depth` PVTv2-style blocks + a skip; Eq. 2-7). The large scale goes
  224 -> 112 (32 ch) -> 56 (64) -> 28 (128) -> 14 (256) -> 7 (512), the medium scale starts at 56,
  the small at 28, so every scale yields features at 28, 14 and 7 (Eq. 8).
* MAFF (Sec. III-C, Eq. 9-11): ECA channel attention, CBL (1x1 conv-BN-LReLU) and Down (3x3 stride-2
  conv-BN-LReLU) fuse them into z_low 128x28x28, z_mid 256x14x14, z_high 512x7x7 (Table I).
  `use_maff=False` is the paper's "without MAFF" ablation: per level a CBL on the concatenation.
* Bottleneck (Sec. III-E, Fig. 8): conv + global mean pool of z_high -> a fully connected
  autoencoder (C -> latent -> 7*7*C) -> a 7x7 map. Skip connections (`num_skips`, paper: 1), each
  through ECA and a 1/4-channel 1x1 bottleneck, start at the deepest level (`skip_from='deepest'`:
  z_high, then z_mid, z_low; Fig. 14) or at the lowest (`'lowest'`: z_low at 28x28, Sec. III-E).
* MTD (Sec. III-D): up blocks (bilinear x2 + 3x3 conv-BN-LReLU, no transposed convs) each followed by
  a ViT module, 7 -> 14 -> 28 -> 56 -> 112 -> 224; three CNN heads reconstruct the small (from the
  56 map), medium (112) and large (224) images (sigmoid, [0, 1]).
* Discriminator (Sec. III-E): its own MTFE + MAFF, global mean pool of z_high, a linear head.
* Losses (Sec. III-G): L_D = 1/2 (||D(I_in) - 0.9||_2 + ||D(I_out) - 0.1||_2) + lambda GP (Eq. 15-16;
  GP on per-sample interpolates, all three scales share epsilon); L_G = 0.6 L_i + 0.3 L_f + 0.1 L_adv
  (Eq. 17-20) with L_i = sum_x (1 - SSIM) + ||I_in - I_out||_2, L_f = ||F_e - F_d||_2 of the encoder's
  (large-scale MTFE) and the decoder's features at 56, 28, 14 (the encoder side is a fixed target by
  default: `feature_loss_stop_gradient`), L_adv = ||D(I_out) - 1||_2. ||.||_2 is either each sample's
  Euclidean norm averaged over the batch ('norm'; on D's scalar output |D - label|) or a mean squared
  error ('mse'), chosen for Eq. 17-18 by `l2_loss` and for Eq. 15, 19 by `adversarial_loss`. The
  default pairs 'norm' with an 'mse' (LSGAN) adversarial term; `:paper` reads 'norm' throughout, so
  every term's image gradient has the scale of its omega (a unit-norm gradient per sample for L_i, and
  |dL_adv/dx| = ||grad D|| ~ 1 under the GP). With 'mse' in L_i the image gradients are ~40x smaller
  than L_adv's, and the generator learns the adversarial term and barely reconstructs.
* Score (Sec. III-F, Eq. 12-14): S_i = sum_x lambda_x ||I_in,x - I_out,x||_2 (channel norm, each
  upsampled to S); S_f = Up(Smooth(||F_e - F_d||_2)) with F resized to 56x56 and concatenated,
  Smooth = mean of stride-1 mean pools with three kernel sizes; S = S_i * S_f. Image score: max of S.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state

from jaxad import losses, optim
from jaxad.models import AnomalyModel, ModelContext, layers

# Config fields of the `tmirn` block that only change scoring: a finished run may be rescored with
# other values (jaxad.provenance).
SCORING_FIELDS = ('scale_weights', 'score_parts', 'smooth_kernels', 'image_smoothing_sigma')
# Config fields that change the parameter layout, with the value a record without them implies: a run
# is only resumed or loaded with the layout its checkpoints have (jaxad.provenance).
LAYOUT_FIELDS = {'scan_blocks': False, 'skip_from': 'deepest', 'scan_scales': False}
# Config fields added after runs were recorded, with the value a record without them implies
# (jaxad.provenance.implied_fields).
ADDED_FIELDS = {'pos_embed': 'module_input', 'adversarial_loss': 'mse'}

NUM_LEVELS = 5  # Encoder levels of the large scale: S/2 ... S/32.
SCALES = ('large', 'medium', 'small')  # Scale i (S / 2^i) starts at encoder level i + 1.
SCANNED_FROM = 3  # The first level that two scales continue from the level above (Encoder.scan_scales).
ARCH_FIELDS = (  # Arch's hyper-parameters, shared by every part of G and of D.
  'base_width',
  'vit_depth',
  'head_dim',
  'pool_tokens',
  'mlp_ratio',
  'dtype',
  'scan_blocks',
  'pos_embed',
  'scan_scales',
)
FEATURE_LEVELS = (2, 3, 4)  # Levels of S_f and L_f: 64x56x56, 128x28x28, 256x14x14 at S = 224.
LEAKY_SLOPE = 0.2


class TrainState(train_state.TrainState):
  """TrainState plus BatchNorm running statistics."""

  batch_stats: dict


def lrelu(x):
  return nn.leaky_relu(x, LEAKY_SLOPE)


def _batch_norm(train: bool, dtype, name=None):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


def multiscale(images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[B, S, S, C] -> (large S, medium S/2, small S/4) bilinear copies (Sec. III-A)."""
  s = images.shape[1]
  return images, layers.resize(images, (s // 2, s // 2)), layers.resize(images, (s // 4, s // 4))


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
  """ECA-Net's adaptive 1-D kernel size: the odd number nearest |log2(C) / gamma + b / gamma|."""
  k = int(abs(math.log2(channels) / gamma + b / gamma))
  return k if k % 2 else k + 1


class ECA(nn.Module):
  """Efficient channel attention (Wang et al., CVPR 2020): x * sigmoid(conv1d_k(mean_hw(x)))."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    y = jnp.mean(x, axis=(1, 2))[:, :, None]  # [B, C, 1]
    k = eca_kernel_size(c)
    y = nn.Conv(1, (k,), padding='SAME', use_bias=False, dtype=self.dtype, name='conv')(y)
    return x * jax.nn.sigmoid(y[:, :, 0])[:, None, None, :].astype(x.dtype)


class CBL(nn.Module):
  """Conv (k x k, stride s) + BatchNorm + LeakyReLU (CBL: 1x1; Down: 3x3 stride 2)."""

  features: int
  kernel: int = 1
  stride: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k, s = self.kernel, self.stride
    x = nn.Conv(self.features, (k, k), strides=(s, s), padding='SAME', use_bias=False, dtype=self.dtype)(x)
    return lrelu(_batch_norm(train, self.dtype)(x))


class ResidualBlock(nn.Module):
  """Eq. 1: LR(BN(conv3x3(LR(BN(conv3x3_s2(T))))) + BN(conv1x1_s2(T))); [H, W, C] -> [H/2, W/2, F]."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, self.features, padding='SAME', use_bias=False, dtype=self.dtype)
    y = conv((3, 3), strides=(2, 2), name='conv1')(x)
    y = lrelu(_batch_norm(train, self.dtype, 'bn1')(y))
    y = _batch_norm(train, self.dtype, 'bn2')(conv((3, 3), name='conv2')(y))
    skip = _batch_norm(train, self.dtype, 'bn_skip')(conv((1, 1), strides=(2, 2), name='skip')(x))
    return lrelu(y + skip)


class PooledAttention(nn.Module):
  """LMSA (Eq. 2-4): multi-head attention over [B, H, W, C] whose K, V are k x k average-pooled."""

  num_heads: int
  pool: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'width {c} is not divisible by num_heads {self.num_heads}')
    hd = c // self.num_heads
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype)
    q = dense((self.num_heads, hd), name='query')(x).reshape(b, h * w, self.num_heads, hd)
    k, v = (dense((self.num_heads, hd), name=n)(x).reshape(b, h, w, c) for n in ('key', 'value'))
    p = self.pool
    k, v = (
      nn.avg_pool(t, window_shape=(p, p), strides=(p, p)).reshape(b, -1, self.num_heads, hd) for t in (k, v)
    )
    y = jax.nn.dot_product_attention(q, k, v)  # softmax(QK'^T / sqrt(d)) V'
    return dense(c, axis=(-2, -1), name='out')(y).reshape(b, h, w, c)


class PVTBlock(nn.Module):
  """Eq. 5-7: Z' = LMSA(LN(Z)) + Z; Z = FFD(LN(Z')) + Z', FFD = conv1x1-DWconv3x3-GELU-conv1x1."""

  num_heads: int
  pool: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    hidden = int(c * self.mlp_ratio)
    x = x + PooledAttention(self.num_heads, self.pool, self.dtype, name='attn')(
      nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='ln1')(x)
    )
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='ln2')(x)
    y = nn.Conv(hidden, (1, 1), dtype=self.dtype, name='fc1')(y)
    y = nn.Conv(hidden, (3, 3), padding='SAME', feature_group_count=hidden, dtype=self.dtype, name='dwconv')(
      y
    )
    y = nn.Conv(c, (1, 1), dtype=self.dtype, name='fc2')(nn.gelu(y, approximate=False))
    return x + y


class ViTModule(nn.Module):
  """Positional embedding (Eq. 5), `depth` PVT blocks and a skip around them (Fig. 5).

  `pos_embed`: 'module_input' adds the learned E_pos once, to the first block's input; 'every_block'
  adds the same E_pos to every block's input, as Eq. 5 writes Z_{l-1} + E_pos for each layer l.
  """

  depth: int
  head_dim: int
  pool_tokens: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  scan_blocks: bool = False  # layers.repeat_blocks: the PVT block compiled once per module.
  pos_embed: str = 'module_input'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, c = x.shape
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, h, w, c))
    pool = max(1, h // self.pool_tokens)
    heads = max(1, c // self.head_dim)
    block = lambda n: PVTBlock(heads, pool, self.mlp_ratio, self.dtype, name=n)
    pos = pos.astype(x.dtype)
    if self.pos_embed == 'every_block':
      return x + layers.repeat_blocks(block, self.depth, self.scan_blocks, 'block', input_offset=pos)(x)
    return x + layers.repeat_blocks(block, self.depth, self.scan_blocks, 'block')(x + pos)


class Arch(nn.Module):
  """Shared hyper-parameters of the encoder/decoder parts."""

  base_width: int
  vit_depth: int = 2
  head_dim: int = 32
  pool_tokens: int = 7
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  scan_blocks: bool = False  # ViTModule.scan_blocks.
  pos_embed: str = 'module_input'  # ViTModule.pos_embed.
  scan_scales: bool = False  # Encoder.scan_scales.

  def arch_kwargs(self) -> dict:
    """The shared hyper-parameters, to build a part with the same ones."""
    return {f: getattr(self, f) for f in ARCH_FIELDS}

  def width(self, level: int) -> int:
    """Channels at encoder level `level` (1: S/2 ... 5: S/32)."""
    return self.base_width * 2 ** (level - 1)

  def vit(self, name):
    return ViTModule(
      self.vit_depth,
      self.head_dim,
      self.pool_tokens,
      self.mlp_ratio,
      self.dtype,
      self.scan_blocks,
      self.pos_embed,
      name=name,
    )


def mtfe_level(arch: Arch, level: int, x: jax.Array, train: bool) -> jax.Array:
  """One MTFE layer inside `arch`'s compact call: residual block (Eq. 1), then the ViT module (Eq. 2-7)."""
  x = ResidualBlock(arch.width(level), arch.dtype, name=f'res_{level}')(x, train)
  return arch.vit(f'vit_{level}')(x) if arch.vit_depth else x


class MTFE(Arch):
  """One scale's feature extractor (Eq. 1-8): image at S/2^(first-1) -> features at levels first ... last.

  Returns {level: map}; level l has size S / 2^l and `width(l)` channels.
  """

  first_level: int = 1
  last_level: int = NUM_LEVELS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[int, jax.Array]:
    feats = {}
    for level in range(self.first_level, self.last_level + 1):
      x = feats[level] = mtfe_level(self, level, x, train)
    return feats


class MTFELevel(Arch):
  """One MTFE layer as a module: the body `Encoder.scan_scales` scans over the scales."""

  level: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return mtfe_level(self, self.level, x, train)


class MAFF(Arch):
  """Eq. 9-11: fuses the three scales' level-3/4/5 features into (z_low, z_mid, z_high) (Table I)."""

  use_maff: bool = True

  @nn.compact
  def __call__(self, per_scale: list[dict[int, jax.Array]], train: bool):
    cat = lambda level: jnp.concatenate([f[level] for f in per_scale], axis=-1)
    if not self.use_maff:  # Ablation: direct fusion of each level by one CBL.
      return tuple(CBL(self.width(l), dtype=self.dtype, name=f'cbl_{l}')(cat(l), train) for l in (3, 4, 5))
    z_low = CBL(self.width(3), dtype=self.dtype, name='cbl_low')(
      ECA(self.dtype, name='eca_low')(cat(3)), train
    )  # Eq. 9
    mid = cat(4)
    down = CBL(mid.shape[-1], 3, 2, self.dtype, name='down_mid')(z_low, train)
    z_mid = CBL(self.width(4), dtype=self.dtype, name='cbl_mid')(
      ECA(self.dtype, name='eca_mid')(ECA(self.dtype, name='eca_mid_in')(mid) + down), train
    )  # Eq. 10
    high = cat(5)
    down = CBL(high.shape[-1], 3, 2, self.dtype, name='down_high')(z_mid, train)
    z_high = CBL(self.width(5), dtype=self.dtype, name='cbl_high')(
      ECA(self.dtype, name='eca_high')(high + down), train
    )  # Eq. 11
    return z_low, z_mid, z_high


class Encoder(Arch):
  """Multi-scale encoder = MTFE per scale + MAFF. Returns (large-scale features, (z_low, z_mid, z_high)).

  `scan_scales`: from level 3 on, the scales that continue from the level above have inputs of one
  shape (large and medium at level 3, all three at levels 4 and 5). Their layers run as one `nn.scan`
  over the scales, with parameters and BatchNorm statistics stacked in scale order under `level_<l>`,
  so XLA compiles each of these layers once instead of once per scale; each scale keeps its own
  weights (`stack_scale_params` maps the per-scale layout onto this one).
  """

  use_maff: bool = True

  @nn.compact
  def __call__(self, scales, train: bool):
    kw = self.arch_kwargs()
    scales = [x.astype(self.dtype) for x in scales]
    last = lambda i: last_own_level(i) if self.scan_scales else NUM_LEVELS
    per_scale = [
      MTFE(**kw, first_level=i + 1, last_level=last(i), name=f'mtfe_{n}')(x, train)
      for i, (n, x) in enumerate(zip(SCALES, scales))
    ]
    across_scales = nn.scan(  # The scan's length is the stacked inputs' leading axis.
      lambda layer, carry, x: (carry, layer(x, train)),
      variable_axes={'params': 0, 'batch_stats': 0},
      split_rngs={'params': True},
    )
    for level in range(SCANNED_FROM, NUM_LEVELS + 1) if self.scan_scales else ():
      members = scanned_scales(level)
      inputs = jnp.stack([per_scale[i][level - 1] for i in members])
      _, outputs = across_scales(MTFELevel(**kw, level=level, name=f'level_{level}'), None, inputs)
      for i, y in zip(members, outputs):
        per_scale[i][level] = y
    fused = MAFF(**kw, use_maff=self.use_maff, name='maff')(per_scale, train)
    return per_scale[0], fused


def last_own_level(scale: int) -> int:
  """With scan_scales, the last level scale `scale` (0: large) runs alone: it starts at level scale + 1."""
  return max(scale + 1, SCANNED_FROM - 1)


def scanned_scales(level: int) -> list[int]:
  """With scan_scales, the scales whose layer `level` (>= SCANNED_FROM) runs in one scan, in order."""
  return [i for i in range(len(SCALES)) if i + 1 < level]


def stack_scale_params(tree: dict) -> dict:
  """A per-scale encoder tree (params or batch_stats; `mtfe_<scale>` holding every level) in the
  `scan_scales` layout: levels from SCANNED_FROM on moved to `level_<l>`, stacked in scale order. A
  tree already in that layout comes back unchanged."""
  if not isinstance(tree, dict):
    return tree
  if f'res_{NUM_LEVELS}' not in tree.get('mtfe_large', {}):  # Not a per-scale encoder.
    return {k: stack_scale_params(v) for k, v in tree.items()}
  out = {k: v for k, v in tree.items() if not k.startswith('mtfe_')}
  for i, name in enumerate(SCALES):
    own = tree[f'mtfe_{name}']
    out[f'mtfe_{name}'] = {k: v for k, v in own.items() if int(k.rsplit('_', 1)[1]) <= last_own_level(i)}
  for level in range(SCANNED_FROM, NUM_LEVELS + 1):
    members = [f'mtfe_{SCALES[i]}' for i in scanned_scales(level)]
    out[f'level_{level}'] = {
      part: jax.tree.map(lambda *leaves: jnp.stack(leaves), *(tree[m][part] for m in members))
      for part in (f'res_{level}', f'vit_{level}')
      if part in tree[members[0]]
    }
  return out


class Bottleneck(nn.Module):
  """Fig. 8: conv + global mean pool -> FC autoencoder (C -> latent -> h*w*C) -> [B, h, w, C]."""

  latent_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    b, h, w, c = z.shape
    y = CBL(c, 3, 1, self.dtype, name='conv')(z, train)
    y = jnp.mean(y, axis=(1, 2))
    y = lrelu(nn.Dense(self.latent_dim, dtype=self.dtype, name='fc_enc')(y))
    y = nn.Dense(h * w * c, dtype=self.dtype, name='fc_dec')(y)
    return y.reshape(b, h, w, c)


class SkipConnection(nn.Module):
  """Fig. 8: ECA, then a 1x1 conv to C/4 and back to C (CBL each)."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    c = z.shape[-1]
    y = ECA(self.dtype, name='eca')(z)
    y = CBL(max(1, c // 4), dtype=self.dtype, name='squeeze')(y, train)
    return CBL(c, dtype=self.dtype, name='expand')(y, train)


class Head(nn.Module):
  """Reconstruction head: 3x3 conv-BN-LReLU to half width, 3x3 conv to the image, sigmoid."""

  channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = CBL(max(x.shape[-1] // 2, self.channels), 3, 1, self.dtype, name='reduce')(x, train)
    x = nn.Conv(self.channels, (3, 3), padding='SAME', dtype=self.dtype, name='out')(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


class MTD(Arch):
  """Multi-scale Transformer decoder (Fig. 7): from 7x7 to S; returns (images, features by level).

  `skips` maps a level (5, 4, 3) to its skip-connection map, concatenated before that level's conv.
  Images: (large S, medium S/2, small S/4); features: {level: map} at levels 1-4 (S/2 ... S/16).
  """

  channels: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, skips: dict[int, jax.Array], train: bool):
    if 5 in skips:
      x = CBL(self.width(5), dtype=self.dtype, name='merge_5')(jnp.concatenate([x, skips[5]], -1), train)
    feats = {}
    for level in range(NUM_LEVELS - 1, -1, -1):  # 4 (S/16) ... 0 (S)
      h, w = x.shape[1:3]
      x = layers.resize(x, (2 * h, 2 * w))
      if level in skips:
        x = jnp.concatenate([x, skips[level]], axis=-1)
      width = self.width(level) if level else max(self.base_width // 2, self.channels)
      x = CBL(width, 3, 1, self.dtype, name=f'up_{level}')(x, train)
      if self.vit_depth:
        x = self.vit(f'vit_{level}')(x)
      feats[level] = x
    heads = {
      lvl: Head(self.channels, self.dtype, name=f'head_{n}')(feats[lvl], train)
      for lvl, n in ((0, 'large'), (1, 'medium'), (2, 'small'))
    }
    return (heads[0], heads[1], heads[2]), feats


class Generator(Arch):
  """Images [B, S, S, C] in [0, 1] -> (3 reconstructions, encoder features, decoder features).

  The features are the large-scale MTFE's and the decoder's maps at levels 2, 3, 4 (56, 28, 14).
  `num_skips` skip connections are counted from `skip_from`: 'deepest' (z_high at level 5, then z_mid,
  z_low; Fig. 14) or 'lowest' (z_low at level 3, 28x28 at S = 224, then z_mid, z_high; Sec. III-E).
  """

  channels: int = 3
  use_maff: bool = True
  num_skips: int = 1
  skip_from: str = 'deepest'
  latent_dim: int = 256

  @nn.compact
  def __call__(self, images: jax.Array, train: bool):
    kw = self.arch_kwargs()
    large, fused = Encoder(**kw, use_maff=self.use_maff, name='encoder')(multiscale(images), train)
    z_high = fused[2]
    x = Bottleneck(self.latent_dim, self.dtype, name='bottleneck')(z_high, train)
    levels = (5, 4, 3) if self.skip_from == 'deepest' else (3, 4, 5)
    skips = {
      level: SkipConnection(self.dtype, name=f'skip_{level}')(fused[level - 3], train)
      for level in levels[: self.num_skips]
    }
    recon, dec = MTD(**kw, channels=self.channels, name='decoder')(x, skips, train)
    enc_f = tuple(large[l] for l in FEATURE_LEVELS)
    dec_f = tuple(dec[l].astype(jnp.float32) for l in FEATURE_LEVELS)
    return recon, tuple(f.astype(jnp.float32) for f in enc_f), dec_f


class Discriminator(Arch):
  """Multi-scale encoder (MTFE + MAFF) + global mean pool of z_high + linear head: [B] scores."""

  use_maff: bool = True

  @nn.compact
  def __call__(self, scales, train: bool) -> jax.Array:
    kw = self.arch_kwargs()
    _, (_, _, z_high) = Encoder(**kw, use_maff=self.use_maff, name='encoder')(scales, train)
    pooled = jnp.mean(z_high.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(1, name='head')(pooled)[:, 0]


def gradient_penalty(critic, real, fake, eps: jax.Array) -> jax.Array:
  """Eq. 15-16: mean over samples of (||grad_x D(x_hat)||_2 - 1)^2, x_hat = eps real + (1 - eps) fake.

  `real`, `fake`: pytrees of [B, ...] arrays (the multi-scale images); `eps` [B]; `critic` maps such
  a pytree to [B] scores. The norm runs over every input element of a sample.
  """
  mix = lambda r, f: (
    eps.reshape((-1,) + (1,) * (r.ndim - 1)) * r + (1 - eps.reshape((-1,) + (1,) * (r.ndim - 1))) * f
  )
  x_hat = jax.tree.map(mix, real, fake)
  grads = jax.grad(lambda x: jnp.sum(critic(x)))(x_hat)
  sq = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree.leaves(grads))
  return jnp.mean(jnp.square(jnp.sqrt(sq + 1e-12) - 1.0))


def l2_norm(a: jax.Array, b: jax.Array) -> jax.Array:
  """||a - b||_2 of Eq. 15-19 read as a norm: the Euclidean norm over each sample's elements (|a - b|
  for D's [B] scores), averaged over the batch."""
  sq = jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)
  return jnp.mean(jnp.sqrt(sq + 1e-12))


# The two readings of ||a - b||_2 in Eq. 15-19 (`tmirn.l2_loss`, `tmirn.adversarial_loss`).
DISTANCES = {'norm': l2_norm, 'mse': losses.mse}


def mean_smooth(maps: jax.Array, kernels: tuple[int, ...]) -> jax.Array:
  """Fig. 9: mean of stride-1 'SAME' mean poolings of [B, H, W] maps with each kernel size."""
  x = maps[..., None]
  pooled = [
    nn.avg_pool(x, window_shape=(k, k), strides=(1, 1), padding='SAME', count_include_pad=False)
    for k in kernels
  ]
  return jnp.mean(jnp.stack(pooled), axis=0)[..., 0]


def _upsample(maps: jax.Array, size: int) -> jax.Array:
  return maps if maps.shape[1] == size else layers.resize_maps(maps, size)


def image_residual(inputs, recons, weights, size: int) -> jax.Array:
  """Eq. 12: S_i = sum_x lambda_x ||I_in,x - I_out,x||_2 (channel norm), each upsampled to size."""
  return sum(w * _upsample(jnp.linalg.norm(a - b, axis=-1), size) for w, a, b in zip(weights, inputs, recons))


def feature_residual(enc_f, dec_f) -> jax.Array:
  """||F_e - F_d||_2 over the channels of all levels, each resized to the largest level's size."""
  size = enc_f[0].shape[1]
  resize = lambda f: layers.resize(f, (size, size))
  sq = sum(jnp.sum(jnp.square(resize(e) - resize(d)), axis=-1) for e, d in zip(enc_f, dec_f))
  return jnp.sqrt(sq + 1e-12)


def anomaly_map(images, recons, enc_f, dec_f, cfg: ml_collections.ConfigDict) -> jax.Array:
  """Eq. 12-14 with the ablation switches of Table VI: [B, S, S]."""
  size = images.shape[1]
  parts = cfg.score_parts
  if parts not in ('both', 'image', 'feature'):
    raise ValueError(f"Unknown tmirn.score_parts {parts!r}; expected 'both', 'image' or 'feature'.")
  out = 1.0
  if parts in ('both', 'image'):
    s_i = image_residual(multiscale(images), recons, cfg.scale_weights, size)
    out = out * layers.gaussian_blur(s_i, cfg.image_smoothing_sigma)
  if parts in ('both', 'feature'):
    s_f = feature_residual(enc_f, dec_f)
    if cfg.smooth_kernels:
      s_f = mean_smooth(s_f, tuple(cfg.smooth_kernels))
    out = out * _upsample(s_f, size)  # Eq. 13-14
  return out


def networks(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> tuple[Generator, Discriminator]:
  """The generator and discriminator a config block describes (checked against the image size)."""
  if ctx.image_size % 2**NUM_LEVELS:
    raise ValueError(f'tmirn needs image_size divisible by {2**NUM_LEVELS}, got {ctx.image_size}')
  if not 0 <= cfg.num_skips <= 3:
    raise ValueError(f'tmirn.num_skips must be 0-3, got {cfg.num_skips}')
  skip_from = cfg.skip_from
  pos_embed = cfg.pos_embed
  if skip_from not in ('deepest', 'lowest'):
    raise ValueError(f"tmirn.skip_from must be 'deepest' or 'lowest', got {skip_from!r}")
  if pos_embed not in ('module_input', 'every_block'):
    raise ValueError(f"tmirn.pos_embed must be 'module_input' or 'every_block', got {pos_embed!r}")
  if len(cfg.scale_weights) != 3:
    raise ValueError(f'tmirn.scale_weights needs 3 entries (large, medium, small): {cfg.scale_weights}')
  common = dict(
    head_dim=cfg.head_dim,
    pool_tokens=cfg.pool_tokens,
    mlp_ratio=cfg.mlp_ratio,
    dtype=ctx.dtype,
    use_maff=cfg.use_maff,
    scan_blocks=cfg.scan_blocks,
    pos_embed=pos_embed,
    scan_scales=cfg.scan_scales,
  )
  gen = Generator(
    base_width=cfg.base_width,
    vit_depth=cfg.vit_depth,
    channels=ctx.channels,
    num_skips=cfg.num_skips,
    skip_from=skip_from,
    latent_dim=cfg.latent_dim,
    **common,
  )
  disc = Discriminator(base_width=cfg.disc_base_width, vit_depth=cfg.disc_vit_depth, **common)
  return gen, disc


def build(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> AnomalyModel:
  gen, disc = networks(cfg, ctx)
  g_tx = ctx.make_optimizer()
  d_tx = ctx.make_optimizer()
  w_i, w_f, w_adv = (float(w) for w in cfg.loss_weights)
  real_label, fake_label = (float(v) for v in cfg.soft_labels)
  ssim_kwargs = dict(filter_size=cfg.ssim_filter_size)
  distance = DISTANCES[cfg.l2_loss]  # Eq. 17-18.
  # Eq. 15, 19 on D's scalar outputs.
  adversarial = DISTANCES[cfg.adversarial_loss]
  target_distance = lambda scores, target: adversarial(scores, jnp.full_like(scores, target))

  def init(rng, batch, frozen):
    del frozen
    x = batch['image']
    kg, kd = jax.random.split(rng)
    gv = gen.init(kg, x, train=False)
    dv = disc.init(kd, multiscale(x), train=False)
    return {
      'g': TrainState.create(apply_fn=gen.apply, params=gv['params'], tx=g_tx, batch_stats=gv['batch_stats']),
      'd': TrainState.create(
        apply_fn=disc.apply, params=dv['params'], tx=d_tx, batch_stats=dv['batch_stats']
      ),
    }

  def train_step(state, batch, rng, frozen):
    del frozen
    x = batch['image'].astype(jnp.float32)
    real = multiscale(x)
    g_state, d_state = state['g'], state['d']

    # One generator forward (train-mode BatchNorm) serves both updates (optim.paired_gan_update).
    def generate(p):
      out, upd = gen.apply(
        {'params': p, 'batch_stats': g_state.batch_stats}, x, train=True, mutable=['batch_stats']
      )
      return out, {'batch_stats': upd['batch_stats']}

    # (1) Discriminator (Eq. 15-16), generator fixed. BatchNorm uses the real+fake batch statistics
    # and updates the running averages from it; the penalty pass uses its own batch statistics.
    def d_loss_fn(p, outputs):
      fake = outputs[0]
      both = jax.tree.map(lambda r, f: jnp.concatenate([r, f]), real, fake)
      scores, upd = disc.apply(
        {'params': p, 'batch_stats': d_state.batch_stats}, both, train=True, mutable=['batch_stats']
      )
      b = x.shape[0]
      d_real, d_fake = scores[:b], scores[b:]
      adv = 0.5 * (target_distance(d_real, real_label) + target_distance(d_fake, fake_label))
      critic = lambda xs: disc.apply(
        {'params': p, 'batch_stats': d_state.batch_stats}, xs, train=True, mutable=['batch_stats']
      )[0]
      eps = jax.random.uniform(rng, (b,))
      gp = gradient_penalty(critic, real, fake, eps)
      loss = adv + cfg.gp_weight * gp
      return loss, (
        {'batch_stats': upd['batch_stats']},
        {'d_adv': adv, 'gp': gp, 'd_real': jnp.mean(d_real), 'd_fake': jnp.mean(d_fake)},
      )

    # (2) Generator with the updated discriminator fixed (Eq. 17-20); D's BatchNorm in train mode,
    # its running statistics left as the D step set them. The loss sees G only through its outputs.
    def g_loss_fn(g_params, outputs, d_state):
      del g_params
      recon, enc_f, dec_f = outputs
      l_ssim = sum(losses.ssim_loss(a, b, **ssim_kwargs) for a, b in zip(real, recon))
      l_l2 = sum(distance(a, b) for a, b in zip(real, recon))
      l_i = l_ssim + l_l2  # Eq. 17
      if cfg.feature_loss_stop_gradient:
        enc_f = jax.lax.stop_gradient(enc_f)
      l_f = sum(distance(e, d) for e, d in zip(enc_f, dec_f))  # Eq. 18
      scores, _ = disc.apply(
        {'params': d_state.params, 'batch_stats': d_state.batch_stats},
        recon,
        train=True,
        mutable=['batch_stats'],
      )
      l_adv = target_distance(scores, 1.0)  # Eq. 19
      loss = w_i * l_i + w_f * l_f + w_adv * l_adv  # Eq. 20
      return loss, {'l_i': l_i, 'ssim_loss': l_ssim, 'l2': l_l2, 'l_f': l_f, 'l_adv': l_adv}

    g_state, d_state, metrics = optim.paired_gan_update(g_state, d_state, generate, d_loss_fn, g_loss_fn)
    return {'g': g_state, 'd': d_state}, metrics

  def score(state, batch, frozen):
    del frozen
    x = batch['image'].astype(jnp.float32)
    g = state['g']
    recon, enc_f, dec_f = gen.apply({'params': g.params, 'batch_stats': g.batch_stats}, x, train=False)
    maps = anomaly_map(x, recon, enc_f, dec_f, cfg)
    return maps, jnp.max(maps, axis=(1, 2))

  return AnomalyModel(init=init, train_step=train_step, score=score)


def count_params(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> dict[str, int]:
  """Parameter counts of generator and discriminator from shapes only (no compute)."""
  gen, disc = networks(cfg, ctx)
  s, c = ctx.image_size, ctx.channels
  x = jax.ShapeDtypeStruct((1, s, s, c), jnp.float32)
  g = jax.eval_shape(lambda x: gen.init(jax.random.key(0), x, train=False), x)
  d = jax.eval_shape(lambda x: disc.init(jax.random.key(0), multiscale(x), train=False), x)
  return {'generator': optim.tree_size(g['params']), 'discriminator': optim.tree_size(d['params'])}
