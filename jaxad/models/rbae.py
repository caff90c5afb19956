"""RB-AE: reference-based autoencoder with two-phase training.

Luo, Yao, Yu and Wang, "Reference-Based Autoencoder for Surface Defect Detection", arXiv:2211.10060,
2022. Results and deviations: docs/models/rbae.md.

Parts (Sec. III, Fig. 1, 3, 6, 8):
  artificial defects I_ad = I_o (1 - I_m) + I_n I_m (Eq. 1): made in the input pipeline
    (jaxad/data/defects.py), batch keys 'defect_image' and 'defect_mask';
  encoder: five conv layers Phi_1..Phi_5, trained with the pixel-level discrimination loss (Eq. 2);
  RBAM on the three deepest layers (l1=3, l2=5): RBFRM (Eq. 3-5) repairs K x K patches of a feature map by
    cosine-similarity softmax attention over the patches of a fixed defect-free reference image's features
    (K = 2 and 4), FFM (Eq. 6-8) fuses F_d, F_rep2, F_rep4 with 5x5-conv attention maps softmaxed across
    the three branches; feature repair loss (Eq. 9);
  decoder: from the (repaired) deepest map, with the (repaired) RBAM layers as skips;
  MSFDM: input and reconstruction re-encoded, features of the first three layers concatenated, three
    segmentation heads, focal loss (Eq. 10), AM = 0.2 AM1 + 0.2 up(AM2) + 0.6 up(AM3) (Eq. 11);
  perceptual loss: L1 between five ReLU maps of ImageNet VGG16 (Eq. 13, 16), the last of each stage or
    the first five (`rbae.perceptual_layers`).
Training (Eq. 14, 17), one phase after the other as `config.phases` schedules them:
  'reconstruct': encoder + decoder, 100 L_rec + 1 L_per + 1 L_pixel_dis (decoder sees raw features of I_o);
  'repair': encoder frozen; RBAM + decoder + MSFDM, 100 L_rec + 1 L_per + 1 L_fea_rep + 1 L_seg (with
    `rbae.stop_segmentation_gradient`, L_seg does not reach the reconstruction).
The reference image is chosen from the training set (`rbae.reference`) and kept in the state, so it is
saved with every checkpoint. Test = phase 2's forward pass; the map is Eq. 11's AM (`rbae.score='msfdm'`)
or the reconstruction residual |I - I_rec| (`'residual'`, not in the paper), Gaussian-smoothed; the image
score is its max (the paper does not say).
Ablation: rbae.use_rbam=False replaces every RBAM with the identity (Table V, column B).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxad import losses
from jaxad.models import AnomalyModel, ModelContext, backbones, layers

# Config fields added after runs were recorded, with the value a record without them implies
# (jaxad.provenance.implied_fields).
ADDED_FIELDS = {'perceptual_layers': 'stage_ends', 'stop_segmentation_gradient': False}

# Config fields of the `rbae` block that only change scoring: a finished run may be rescored with
# other values (jaxad.provenance).
SCORING_FIELDS = ('score', 'smoothing_sigma', 'map_weights')

PHASES = ('reconstruct', 'repair')

# Which five VGG16 ReLU maps the perceptual loss compares (Eq. 13, 16; `rbae.perceptual_layers`).
PERCEPTUAL_LAYERS = {
  'stage_ends': 'relu1_2, relu2_2, relu3_3, relu4_3, relu5_3',  # the backbone's maps (config.backbone)
  'first': 'relu1_1, relu1_2, relu2_1, relu2_2, relu3_1',  # the first five ReLUs in the network
}
VGG16_FIRST_CONVS = (('features_0', 'features_2'), ('features_5', 'features_7'), ('features_10',))  # by stage


class ConvBlock(nn.Module):
  """Two 3x3 conv + GroupNorm + ReLU; the first conv has the stride."""

  features: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, s in enumerate((self.stride, 1)):
      x = nn.Conv(self.features, (3, 3), strides=(s, s), dtype=self.dtype, name=f'conv{i}')(x)
      x = nn.relu(nn.GroupNorm(num_groups=min(8, self.features), dtype=self.dtype, name=f'norm{i}')(x))
    return x


class Encoder(nn.Module):
  """Five layers Phi_1..Phi_5 (Sec. III-B); returns all five maps."""

  channels: tuple[int, ...]
  strides: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    feats = []
    for i, (c, s) in enumerate(zip(self.channels, self.strides)):
      x = ConvBlock(c, s, self.dtype, name=f'layer{i + 1}')(x)
      feats.append(x.astype(jnp.float32))
    return feats


def rbfrm(features: jax.Array, reference: jax.Array, k: int, scale: float = 1.0) -> jax.Array:
  """RBFRM (Eq. 3-5): every K x K patch p_i of `features` [B, H, W, C] becomes sum_j softmax_j(scale *
  cos(p_i, b_j)) b_j over the K x K patches b_j of `reference` [1, H', W', C] (Eq. 4: scale 1)."""
  _, h, w, c = features.shape
  p = layers.patchify(features, k)
  ref = layers.patchify(reference, k)[0]
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  sim = jnp.einsum('bnd,md->bnm', unit(p), unit(ref))  # Eq. 3
  repaired = jax.nn.softmax(scale * sim, axis=-1) @ ref  # Eq. 4, 5
  return layers.unpatchify(repaired, h // k, w // k, k, c)


class FFM(nn.Module):
  """Feature fusion (Eq. 6-8): returns F_o and the attention maps [3, B, H, W, C] (order d, rep2, rep4)."""

  width: int = 64
  kernel: int = 5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, f_d, f_rep2, f_rep4):
    m = (self.kernel, self.kernel)
    conv = lambda width, name: nn.Conv(width, m, dtype=self.dtype, name=name)
    z = nn.relu(conv(self.width, 'squeeze')(f_d + f_rep2 + f_rep4))  # Eq. 6 + compression
    logits = jnp.stack([conv(f_d.shape[-1], f'attn_{n}')(z) for n in ('d', 'rep2', 'rep4')])
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=0)  # Eq. 7
    return jnp.sum(attn * jnp.stack([f_d, f_rep2, f_rep4]), axis=0), attn  # Eq. 8


class RBAM(nn.Module):
  """RBFRM with K = patch_sizes[0] and [1], then FFM (Fig. 3a)."""

  patch_sizes: tuple[int, int]
  scale: float
  ffm_width: int
  ffm_kernel: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, f_d, f_ref):
    reps = [rbfrm(f_d, f_ref, k, self.scale) for k in self.patch_sizes]
    return FFM(self.ffm_width, self.ffm_kernel, self.dtype, name='ffm')(f_d, *reps)[0]


def _upsample_to(x, hw):
  return layers.resize(x, hw, method='nearest')


class Decoder(nn.Module):
  """From the deepest map up to the image: a ConvBlock per encoder layer in reverse; the maps in `skips`
  (layer index -> map) are concatenated at their resolution. Sigmoid output in [0, 1]."""

  channels: tuple[int, ...]
  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, deepest, skips: dict, sizes: list):
    x = deepest
    for i in range(len(self.channels) - 2, -1, -1):
      x = _upsample_to(x, sizes[i])
      if i in skips:
        x = jnp.concatenate([x, skips[i].astype(x.dtype)], -1)
      x = ConvBlock(self.channels[i], dtype=self.dtype, name=f'up{i + 1}')(x)
    out = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name='out')(x)
    return nn.sigmoid(out.astype(jnp.float32))


class FDM(nn.Module):
  """One MSFDM head: concatenated features -> anomaly logits [B, h, w]."""

  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ConvBlock(self.width, dtype=self.dtype, name='block')(x)
    return nn.Conv(1, (1, 1), dtype=self.dtype, name='logit')(x)[..., 0].astype(jnp.float32)


class RBAE(nn.Module):
  channels: tuple[int, ...]
  strides: tuple[int, ...]
  out_channels: int
  rbam_layers: tuple[int, ...]  # 0-based encoder layers with an RBAM
  patch_sizes: tuple[int, int]
  similarity_scale: float
  ffm_width: int
  ffm_kernel: int
  use_rbam: bool
  head_width: int
  stop_segmentation_gradient: bool = False  # MSFDM re-encodes the reconstruction as a constant.
  dtype: jnp.dtype = jnp.float32  # Activation/matmul dtype; features, maps and outputs are float32.

  def setup(self):
    self.encoder = Encoder(self.channels, self.strides, self.dtype)
    if self.use_rbam:
      self.rbams = [
        RBAM(self.patch_sizes, self.similarity_scale, self.ffm_width, self.ffm_kernel, self.dtype)
        for _ in self.rbam_layers
      ]
    self.decoder = Decoder(self.channels, self.out_channels, self.dtype)
    self.msfdm = [FDM(self.head_width, self.dtype) for _ in range(3)]

  def encode(self, x):
    return self.encoder(x)

  def repair(self, feats, ref_feats):
    """Features of the RBAM layers after repair (identity without RBAM), as {layer: map}."""
    if not self.use_rbam:
      return {l: feats[l] for l in self.rbam_layers}
    return {l: m(feats[l], ref_feats[l]) for l, m in zip(self.rbam_layers, self.rbams)}

  def decode(self, feats, repaired=None):
    """Reconstruction from the encoder maps, the RBAM layers replaced by `repaired` when given."""
    maps = {l: (repaired or {}).get(l, feats[l]) for l in self.rbam_layers}
    last = len(self.channels) - 1
    skips = {l: m for l, m in maps.items() if l != last}
    return self.decoder(maps[last], skips, [f.shape[1:3] for f in feats])

  def segment(self, image_feats, recon_feats):
    """MSFDM logits [B, h_i, w_i] from the first three layers' concatenated features (Fig. 6)."""
    return [
      head(jnp.concatenate([a, b], -1)) for head, a, b in zip(self.msfdm, image_feats[:3], recon_feats[:3])
    ]

  def __call__(self, image, reference):
    """Phase-2/test forward: (reconstruction, MSFDM logits, repaired maps, encoder maps)."""
    feats = self.encode(image)
    repaired = self.repair(feats, self.encode(reference))
    recon = self.decode(feats, repaired)
    seen = jax.lax.stop_gradient(recon) if self.stop_segmentation_gradient else recon
    return recon, self.segment(feats, self.encode(seen)), repaired, feats


def resize_mask(mask, hw):
  """Area-resized soft mask [B, h, w] of a [B, H, W] mask."""
  return layers.resize(mask, hw)


def pixel_discrimination_loss(feats_o, feats_ad, mask) -> jax.Array:
  """Eq. 2: mean over layers of || N(M(|Phi_l(I_o) - Phi_l(I_ad)|^2)) - I_m^l ||^2 (N: per-image min-max)."""
  terms = []
  for fo, fa in zip(feats_o, feats_ad):
    d = jnp.mean(jnp.square(fo - fa), -1)
    lo, hi = d.min((1, 2), keepdims=True), d.max((1, 2), keepdims=True)
    terms.append(jnp.mean(jnp.square((d - lo) / (hi - lo + 1e-8) - resize_mask(mask, d.shape[1:3]))))
  return jnp.mean(jnp.stack(terms))


def vgg16_first_relus(vgg, params, images, dtype=jnp.float32) -> list[jax.Array]:
  """relu1_1, relu1_2, relu2_1, relu2_2, relu3_1 of the frozen VGG16 `vgg` (its weights `params` and its
  preprocessing), float32; the backbone itself returns only the last ReLU of each stage."""
  x = backbones.preprocess_fn(vgg.preprocess)(jnp.asarray(images, jnp.float32)).astype(dtype)
  maps = []
  for stage, convs in enumerate(VGG16_FIRST_CONVS):
    if stage:
      x = nn.max_pool(x, (2, 2), (2, 2))
    for name in convs:
      conv = params['params'][name]
      x = jax.lax.conv_general_dilated(
        x, conv['kernel'].astype(dtype), (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
      x = nn.relu(x + conv['bias'].astype(dtype))
      maps.append(x.astype(jnp.float32))
  return maps


def anomaly_map(logits, size: int, weights) -> jax.Array:
  """Eq. 11: sum_i lambda_i g(sigmoid(AM_i)) at the input size."""
  return sum(w * layers.resize_maps(jax.nn.sigmoid(a), size) for w, a in zip(weights, logits))


def choose_reference(source, how: str, index: int) -> np.ndarray:
  """The defect-free reference image [1, H, W, C]: training image `index`, or the 'medoid' (the training
  image nearest, in L2, to the mean training image)."""
  if how == 'index':
    if not 0 <= index < len(source):
      raise ValueError(f'rbae.reference_index {index} outside the {len(source)} training images')
    return source[index]['image'][None]
  if how != 'medoid':
    raise ValueError(f"Unknown rbae.reference {how!r}; expected 'medoid' or 'index'.")
  images = np.stack([source[i]['image'] for i in range(len(source))])
  dist = np.square(images - images.mean(0)).reshape(len(images), -1).sum(1)
  return images[int(np.argmin(dist))][None]


def network(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> RBAE:
  return RBAE(
    tuple(cfg.channels),
    tuple(cfg.strides),
    ctx.channels,
    tuple(l - 1 for l in cfg.rbam_layers),
    tuple(cfg.patch_sizes),
    cfg.similarity_scale,
    cfg.ffm_width,
    cfg.ffm_kernel,
    cfg.use_rbam,
    cfg.head_width,
    cfg.stop_segmentation_gradient,
    ctx.dtype,
  )


def perceptual_layers(cfg: ml_collections.ConfigDict) -> str:
  return cfg.perceptual_layers


def _check(cfg: ml_collections.ConfigDict, ctx: ModelContext):
  names = tuple(ctx.phase_steps)
  if cfg.score not in ('msfdm', 'residual'):
    raise ValueError(f"Unknown rbae.score {cfg.score!r}; expected 'msfdm' or 'residual'.")
  if perceptual_layers(cfg) not in PERCEPTUAL_LAYERS:
    raise ValueError(
      f'Unknown rbae.perceptual_layers {cfg.perceptual_layers!r}; expected one of {tuple(PERCEPTUAL_LAYERS)}.'
    )
  if names != PHASES:
    raise ValueError(f'rbae needs config.phases named {PHASES} in this order, got {names}')
  if len(cfg.channels) != 5 or len(cfg.strides) != 5:
    raise ValueError('rbae.channels and rbae.strides need five entries (five encoder layers)')
  if tuple(cfg.rbam_layers) != tuple(range(cfg.rbam_layers[0], 6)):
    raise ValueError(f'rbae.rbam_layers {tuple(cfg.rbam_layers)} must be the deepest layers l1..5')
  size = ctx.image_size
  for l in cfg.rbam_layers:
    side = size // int(np.prod(cfg.strides[:l]))
    if size % int(np.prod(cfg.strides[:l])) or any(side % k for k in cfg.patch_sizes):
      raise ValueError(
        f'image_size {size}: layer {l} map ({side}) is not divisible by the RBFRM patch '
        f'sizes {tuple(cfg.patch_sizes)}'
      )


def build(cfg: ml_collections.ConfigDict, ctx: ModelContext) -> AnomalyModel:
  _check(cfg, ctx)
  net = network(cfg, ctx)
  vgg = ctx.backbone
  if vgg is None:
    raise ValueError("rbae's perceptual loss (Eq. 13, 16) needs config.backbone.arch='vgg16'.")
  txs = {p: ctx.make_optimizer(ctx.phase_steps[p]) for p in PHASES}
  groups = {'reconstruct': ('encoder', 'decoder'), 'repair': ('rbams', 'decoder', 'msfdm')}
  trained = lambda params, phase: {
    k: v
    for k, v in params.items()  # setup lists name rbams_0, ...
    if k.rsplit('_', 1)[0] in groups[phase]
  }
  size = ctx.image_size

  if perceptual_layers(cfg) == 'first':
    if VGG16_FIRST_CONVS[-1][-1] not in vgg.params['params']:
      raise ValueError(
        "rbae.perceptual_layers='first' needs VGG16 up to relu3_1: config.backbone.features must include 2."
      )
    relu_maps = lambda params, x: vgg16_first_relus(vgg, params, x, ctx.dtype)
  else:
    relu_maps = vgg.apply_fn

  def perceptual(frozen, a, b):
    """Eq. 13/16: mean over the VGG16 ReLU maps of the mean absolute difference, / vgg_feature_scale."""
    rgb = lambda x: jnp.broadcast_to(x, (*x.shape[:3], 3))
    fa = relu_maps(frozen['vgg'], rgb(a))
    fb = relu_maps(frozen['vgg'], rgb(b))
    return jnp.mean(jnp.stack([jnp.mean(jnp.abs(x - y)) for x, y in zip(fa, fb)])) / cfg.vgg_feature_scale

  def init(rng, batch, frozen):
    del frozen
    if 'reference' not in batch:
      raise KeyError("rbae.init needs batch['reference'] (the harness adds it via model.prepare)")
    reference = batch['reference'][:1]
    params = net.init(rng, batch['image'][:1], reference)['params']
    opt = {p: txs[p].init(trained(params, p)) for p in PHASES}
    return {'params': params, 'opt': opt, 'reference': reference}

  def reconstruct_loss(sub, params, batch, frozen):
    """Eq. 14 (phase 1)."""
    p = {**params, **sub}
    image, defect, mask = batch['image'], batch['defect_image'], batch['defect_mask']
    feats_o = net.apply({'params': p}, image, method=RBAE.encode)
    feats_ad = net.apply({'params': p}, defect, method=RBAE.encode)
    recon = net.apply({'params': p}, feats_o, method=RBAE.decode)
    parts = {
      'rec': losses.mse(image, recon),
      'per': perceptual(frozen, image, recon),
      'pixel_dis': pixel_discrimination_loss(feats_o, feats_ad, mask),
    }
    loss = cfg.w_rec1 * parts['rec'] + cfg.w_per1 * parts['per'] + cfg.w_pixel_dis1 * parts['pixel_dis']
    return loss, parts

  def repair_loss(sub, params, batch, frozen, reference):
    """Eq. 17 (phase 2); the encoder is a constant here."""
    p = {**params, **sub}
    image, defect, mask = batch['image'], batch['defect_image'], batch['defect_mask']
    feats_o = jax.lax.stop_gradient(net.apply({'params': p}, image, method=RBAE.encode))
    recon, logits, repaired, _ = net.apply({'params': p}, defect, reference)
    parts = {
      'rec': losses.mse(image, recon),
      'per': perceptual(frozen, image, recon),
      'seg': jnp.mean(
        jnp.stack(
          [  # Eq. 10
            jnp.mean(optax.sigmoid_focal_loss(a, resize_mask(mask, a.shape[1:3]), gamma=cfg.focal_gamma))
            for a in logits
          ]
        )
      ),
    }
    loss = cfg.w_rec2 * parts['rec'] + cfg.w_per2 * parts['per'] + cfg.w_seg2 * parts['seg']
    if cfg.use_rbam:  # Eq. 9 (mean)
      parts['fea_rep'] = jnp.mean(jnp.stack([losses.mse(r, feats_o[l]) for l, r in repaired.items()]))
      loss = loss + cfg.w_fea_rep2 * parts['fea_rep']
    return loss, parts

  def train_step(state, batch, rng, frozen, phase):
    del rng
    params = state['params']
    sub = trained(params, phase)
    if phase == 'reconstruct':
      loss_fn = lambda s: reconstruct_loss(s, params, batch, frozen)
    else:
      loss_fn = lambda s: repair_loss(s, params, batch, frozen, state['reference'])
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(sub)
    updates, opt = txs[phase].update(grads, state['opt'][phase], sub)
    sub = optax.apply_updates(sub, updates)
    metrics = {'loss': loss, **parts, 'grad_norm': optax.tree.norm(grads), 'param_norm': optax.tree.norm(sub)}
    return {**state, 'params': {**params, **sub}, 'opt': {**state['opt'], phase: opt}}, metrics

  def score(state, batch, frozen):
    del frozen
    image = batch['image']
    recon, logits, _, _ = net.apply({'params': state['params']}, image, state['reference'])
    raw = (
      anomaly_map(logits, size, cfg.map_weights)
      if cfg.score == 'msfdm'
      else jnp.mean(jnp.abs(image - recon), axis=-1)
    )
    maps = layers.gaussian_blur(raw, cfg.smoothing_sigma)
    return maps, jnp.max(maps, axis=(1, 2))

  def prepare(source):
    return {'reference': choose_reference(source, cfg.reference, cfg.reference_index)}

  return AnomalyModel(
    init=init, train_step=train_step, score=score, frozen={'vgg': vgg.params}, prepare=prepare
  )
