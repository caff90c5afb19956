"""ViT-Mem-CA (jaxad/models/vit_memae.py): memory addressing, coordinate attention, SSIM, the configs
through the harness, learning on a small generated dataset, and the memory's suppression of a pasted
defect (slow)."""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import override

from jaxad import losses, metrics, parallel, train
from jaxad.data import folder, pipeline
from jaxad.models import vit_memae

# --------------------------------------------------------------------------- memory (Eq. 7-10)


def _memory(items: np.ndarray, **kwargs):
  mem = vit_memae.Memory(items.shape[0], **kwargs)
  return lambda z: mem.apply({'params': {'items': jnp.asarray(items)}}, jnp.asarray(z))


def test_shrunk_addressing_weights_are_a_sparse_distribution():
  rng = np.random.default_rng(0)
  n, c = 50, 32
  items = rng.normal(size=(n, c)).astype(np.float32)
  z = rng.normal(size=(4, 6, 6, c)).astype(np.float32)
  z_hat, w = _memory(items)(z)
  w = np.asarray(w)
  assert z_hat.shape == z.shape and w.shape == (4, 6, 6, n)
  assert np.all(w >= 0)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  # Shrinkage zeroes every softmax weight below lambda = 1/N, so what is left is sparse.
  assert np.all((w == 0).sum(-1) > 0)
  np.testing.assert_allclose(np.asarray(z_hat), np.einsum('...n,nc->...c', w, items), atol=1e-5)
  # shrink_scale=0 is the plain softmax (Eq. 8): dense, strictly positive, sums to 1.
  _, dense = _memory(items, shrink_scale=0.0)(z)
  assert np.all(np.asarray(dense) > 0)
  np.testing.assert_allclose(np.asarray(dense).sum(-1), 1.0, atol=1e-5)


def test_hard_shrink_is_relu_gate():
  w = jnp.array([0.0, 0.01, 0.0199, 0.0201, 0.5])
  np.testing.assert_allclose(np.asarray(vit_memae.hard_shrink(w, 0.02)), [0, 0, 0, 0.0201, 0.5], rtol=1e-6)


def test_query_equal_to_a_memory_item_retrieves_it():
  rng = np.random.default_rng(1)
  n, c = 40, 64
  # Orthogonal items (any scale): the query's cosine is 1 with its own item and 0 with the others,
  # so with the paper's temperature 1 every other weight is 1 / (e + N - 1) < 1/N and is shrunk away.
  q, _ = np.linalg.qr(rng.normal(size=(c, n)))
  items = (q.T * rng.uniform(0.5, 3.0, size=(n, 1))).astype(np.float32)
  idx = [0, 7, 39]
  z_hat, w = _memory(items)(items[idx] * 2.5)  # Cosine addressing ignores the query's scale.
  np.testing.assert_allclose(np.asarray(w), np.eye(n, dtype=np.float32)[idx], atol=1e-6)
  np.testing.assert_allclose(np.asarray(z_hat), items[idx], atol=1e-5)
  # Random (non-orthogonal) items: a sharper softmax still retrieves the item closely...
  items = rng.normal(size=(n, c)).astype(np.float32)
  z_hat, w = _memory(items, temperature=0.05)(items[idx])
  assert np.all(np.asarray(w)[np.arange(3), idx] > 0.95)
  rel = np.linalg.norm(np.asarray(z_hat) - items[idx], axis=-1) / np.linalg.norm(items[idx], axis=-1)
  assert np.all(rel < 0.1), rel
  # ... and without shrinkage the plain temperature-1 softmax blurs it (why Eq. 10 is there).
  z_hat, _ = _memory(items, shrink_scale=0.0)(items[idx])
  rel = np.linalg.norm(np.asarray(z_hat) - items[idx], axis=-1) / np.linalg.norm(items[idx], axis=-1)
  assert np.all(rel > 0.5), rel


# --------------------------------------------------------------------------- coordinate attention


def test_coordinate_attention_shape_and_batch_stats():
  x = jax.random.normal(jax.random.key(0), (3, 5, 7, 48))
  ca = vit_memae.CoordinateAttention(reduction=4)
  v = ca.init(jax.random.key(1), x, train=False)
  y, upd = ca.apply(v, x, train=True, mutable=['batch_stats'])
  assert y.shape == x.shape
  assert v['params']['conv_shared']['kernel'].shape == (1, 1, 48, 12)
  assert not np.allclose(
    np.asarray(upd['batch_stats']['bn']['mean']), np.asarray(v['batch_stats']['bn']['mean'])
  )
  assert ca.apply(v, x, train=False).shape == x.shape


@pytest.mark.parametrize('train_mode', [False, True])
def test_coordinate_attention_is_identity_when_gates_saturate(train_mode):
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 16))
  ca = vit_memae.CoordinateAttention(reduction=2, gate_bias_init=nn.initializers.constant(40.0))
  v = ca.init(jax.random.key(1), x, train=False)
  y = (
    ca.apply(v, x, train=train_mode, mutable=['batch_stats'])[0]
    if train_mode
    else ca.apply(v, x, train=False)
  )
  np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)
  # With ordinary gates the output is x re-weighted by a factor in (0, 1) per (h, c) and (w, c).
  ca0 = vit_memae.CoordinateAttention(reduction=2)
  y0 = np.asarray(ca0.apply(ca0.init(jax.random.key(1), x, train=False), x, train=False))
  ratio = y0 / np.asarray(x)
  assert np.all((ratio > 0) & (ratio < 1))


# --------------------------------------------------------------------------- SSIM, transposed conv


def _test_images(seed=0, n=2, size=48, channels=3):
  from scipy import ndimage

  rng = np.random.default_rng(seed)
  a = ndimage.gaussian_filter(rng.random((n, size, size, channels)), (0, 2, 2, 0))
  a = (a - a.min()) / (a.max() - a.min())
  b = np.clip(a + 0.08 * rng.normal(size=a.shape), 0, 1)
  return a.astype(np.float32), b.astype(np.float32)


def test_dm_pix_ssim_matches_skimage():
  from skimage.metrics import structural_similarity

  a, b = _test_images()
  ours = np.asarray(losses.ssim_map(jnp.asarray(a), jnp.asarray(b), pad=None)).mean(axis=(1, 2))
  ref = [
    structural_similarity(
      x, y, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    for x, y in zip(a, b)
  ]
  np.testing.assert_allclose(ours, ref, atol=2e-5)
  # The banded-matmul window equals dm-pix's own filter; the padded map is full size.
  import dm_pix

  plain = np.asarray(dm_pix.ssim(jnp.asarray(a), jnp.asarray(b), return_map=True)).mean(-1)
  np.testing.assert_allclose(
    np.asarray(losses.ssim_map(jnp.asarray(a), jnp.asarray(b), pad=None)), plain, atol=2e-5
  )
  full = losses.ssim_map(jnp.asarray(a), jnp.asarray(b))
  assert full.shape == a.shape[:3]
  assert float(losses.ssim_loss(jnp.asarray(a), jnp.asarray(a))) == pytest.approx(0.0, abs=1e-5)
  assert 0.05 < float(losses.ssim_loss(jnp.asarray(a), jnp.asarray(b))) < 1.0


@pytest.mark.parametrize('kernel,stride', [(4, 2), (3, 1), (6, 3)])
def test_subpixel_conv_transpose_equals_flax(kernel, stride):
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  ref = nn.ConvTranspose(4, (kernel, kernel), strides=(stride, stride), padding='SAME')
  params = ref.init(jax.random.key(1), x)
  ours = vit_memae.SubpixelConvTranspose(4, kernel, stride)
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(ref.apply(params, x)), atol=1e-5)


# ------------------------------------------------------------------ decoder (Sec. 3.4), Eq. 11, CA placement


def _calls(fn, select):
  """fn() under flax's method interception: its result and (name, input, output) of the selected calls."""
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and select(context.module):
      calls.append((context.module.name, args[0], out))
    return out

  with nn.intercept_methods(record):
    result = fn()
  return result, calls


@pytest.mark.parametrize('output', ['deconv', 'conv'])
def test_decoder_layers_and_tanh_output(output):
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  channels = (8, 8, 8, 8, 8) if output == 'deconv' else (8, 8, 8, 8, 8, 8)
  dec = vit_memae.Decoder(channels, strides=(1, 1, 2, 2, 2, 2), out_channels=3, output=output)
  v = dec.init(jax.random.key(1), x, train=False)
  layer_types = (vit_memae.SubpixelConvTranspose, nn.BatchNorm, nn.Conv)
  y, calls = _calls(lambda: dec.apply(v, x, train=False), lambda m: isinstance(m, layer_types))
  names = [name for name, _, _ in calls]
  if output == 'deconv':  # Sec. 3.4: six transposed convs, BN + ReLU after the first five.
    assert names == [n for i in range(6) for n in (f'deconv_{i}', f'bn_{i}') if n != 'bn_5']
    assert v['params']['deconv_5']['kernel'].shape == (4, 4, 8, 3)
    assert 'bias' in v['params']['deconv_5'] and 'bias' not in v['params']['deconv_4']
  else:  # Six transposed convs with BN + ReLU, then the 3x3 head.
    assert names == [n for i in range(6) for n in (f'deconv_{i}', f'bn_{i}')] + ['head']
    assert v['params']['head']['kernel'].shape == (3, 3, 8, 3)
  assert sorted(v['params']) == sorted(set(names))
  # The last layer's output goes straight into tanh: no BN or ReLU after it.
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.tanh(calls[-1][2])))
  assert y.shape == (2, 64, 64, 3)
  # Range: a large last kernel saturates tanh at both ends and never leaves [-1, 1].
  last = names[-1]
  big = jax.tree.map(lambda a: a, v)
  big['params'][last]['kernel'] = v['params'][last]['kernel'] * 1e3
  y = np.asarray(dec.apply(big, x, train=False))
  assert y.min() >= -1.0 and y.max() <= 1.0
  assert y.min() < -0.999 and y.max() > 0.999


def test_decoder_output_configs_and_stage_check(tiny_dataset):
  from configs import vit_memae as cfg_module

  assert cfg_module.get_config().vit_memae.decoder_output == 'conv'
  assert cfg_module.get_config('paper').vit_memae.decoder_output == 'deconv'
  for variant in ('', 'paper'):
    c = cfg_module.get_config(variant).vit_memae
    assert len(c.decoder_strides) == 6  # Six transposed convs in both.
  config = tiny_vit_memae_config(tiny_dataset, 'paper', **{'vit_memae.decoder_channels': (8,) * 6})
  with pytest.raises(ValueError, match='7 with decoder_output'):
    train.build_model(config, 10)


def test_eq11_l2_sums_channels_and_averages_pixels():
  rng = np.random.default_rng(0)
  x = rng.random((3, 10, 12, 3)).astype(np.float32)
  x_hat = rng.random((3, 10, 12, 3)).astype(np.float32)
  h, w = x.shape[1:3]
  # (1/WH) ||X - X_hat||_2^2 per image, then the batch mean.
  ref = np.mean([np.sum((a.astype(np.float64) - b) ** 2) / (w * h) for a, b in zip(x, x_hat)])
  np.testing.assert_allclose(float(vit_memae.l2_loss(x, x_hat, 'sum')), ref, rtol=1e-6)
  np.testing.assert_allclose(float(vit_memae.l2_loss(x, x_hat, 'mean')), ref / 3, rtol=1e-6)


@pytest.mark.slow
def test_train_step_logs_eq11_l2_of_its_reconstruction(tiny_dataset):
  from configs import vit_memae as cfg_module

  assert cfg_module.get_config().vit_memae.l2_channels == 'sum'
  assert cfg_module.get_config('paper').vit_memae.l2_channels == 'sum'
  config = tiny_vit_memae_config(tiny_dataset, **{'vit_memae.num_memory': 10})
  ctx = train.model_context(config, 1)
  model = vit_memae.build(config.vit_memae, ctx)
  images = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 3)), jnp.float32)
  state = model.init(jax.random.key(0), {'image': images}, None)
  _, logs = model.train_step(state, {'image': images}, jax.random.key(1), None)
  net = vit_memae.network(config.vit_memae, ctx)
  (recon, _), _ = net.apply(
    {'params': state.params, 'batch_stats': state.batch_stats}, images, train=True, mutable=['batch_stats']
  )
  diff = np.asarray(images, np.float64) - np.asarray(recon, np.float64)
  np.testing.assert_allclose(float(logs['l2']), np.mean(np.sum(diff**2, axis=-1)), rtol=1e-5)


@pytest.mark.parametrize('placement', ['after_memory', 'before_memory'])
def test_coord_attention_placement_moves_the_ca_module(placement, tiny_dataset):
  config = tiny_vit_memae_config(
    tiny_dataset, **{'vit_memae.num_memory': 10, 'vit_memae.coord_attention_placement': placement}
  )
  net = vit_memae.network(config.vit_memae, train.model_context(config, 1))
  x = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 3)), jnp.float32)
  v = net.init(jax.random.key(0), x, train=False)
  top = ('encoder', 'memory', 'coord_attention', 'decoder')
  (y, _), calls = _calls(
    lambda: net.apply(v, x, train=False),
    lambda m: m.parent is not None and m.name in top and m.parent.name is None,
  )
  called = {name: (inp, out) for name, inp, out in calls}
  encoder_map = called['encoder'][1][0]
  memory_out = called['memory'][1][0].astype(encoder_map.dtype)
  if placement == 'after_memory':  # Fig. 2: encoder -> memory -> CA -> decoder.
    assert [c[0] for c in calls] == ['encoder', 'memory', 'coord_attention', 'decoder']
    np.testing.assert_array_equal(called['memory'][0], encoder_map)
    np.testing.assert_array_equal(called['coord_attention'][0], memory_out)
    np.testing.assert_array_equal(called['decoder'][0], called['coord_attention'][1])
  else:  # Sec. 3.3: encoder -> CA -> memory -> decoder.
    assert [c[0] for c in calls] == ['encoder', 'coord_attention', 'memory', 'decoder']
    np.testing.assert_array_equal(called['coord_attention'][0], encoder_map)
    np.testing.assert_array_equal(called['memory'][0], called['coord_attention'][1])
    np.testing.assert_array_equal(called['decoder'][0], memory_out)
  assert y.shape == x.shape


def test_coord_attention_placement_keeps_the_parameter_layout(tiny_dataset):
  shapes = {}
  for placement in vit_memae.CA_PLACEMENTS:
    config = tiny_vit_memae_config(
      tiny_dataset, **{'vit_memae.num_memory': 10, 'vit_memae.coord_attention_placement': placement}
    )
    net = vit_memae.network(config.vit_memae, train.model_context(config, 1))
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    shapes[placement] = jax.tree.map(lambda a: a.shape, variables)
  assert shapes['after_memory'] == shapes['before_memory']
  config = tiny_vit_memae_config(tiny_dataset, **{'vit_memae.coord_attention_placement': 'middle'})
  with pytest.raises(ValueError, match='coord_attention_placement'):
    train.build_model(config, 10)


# --------------------------------------------------------------------------- configs through the harness


def tiny_vit_memae_config(root: str, variant: str = '', **overrides):
  """configs/vit_memae.py[:variant] at 64x64 with a 1-block ViT and a thin decoder (same structure)."""
  from configs import vit_memae as cfg_module

  c = cfg_module.get_config(variant)
  c.dataset.name = 'folder'
  c.dataset.root = root
  c.dataset.image_size = 64
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_epochs = 1
  c.log_every = 1
  c.checkpoint_every = 1000
  c.num_heatmaps = 0
  c.vit_memae.width = 64 if variant else 32  # :paper keeps its 8 heads (head dim 8).
  c.vit_memae.num_heads = 8 if variant else 4
  c.vit_memae.depth = 1
  # Six BN + ReLU stages with the default's 'conv' output, five with :paper's 'deconv'.
  c.vit_memae.decoder_channels = (32, 32, 16, 16, 8, 8)[: 6 - (c.vit_memae.decoder_output == 'deconv')]
  c.vit_memae.smoothing_sigma = 2.0
  return override(c, **overrides)


def _train(config, workdir, categories=None, stop_after=None):
  root = config.dataset.root
  categories = categories or folder.resolve_categories(root, 'all')
  samples = [s for c in categories for s in pipeline.scan(config, root, c, 'train')]
  return train.train(config, str(workdir), samples, parallel.make_mesh(), stop_after=stop_after)


def _score(config, model, state, category):
  from jaxad import evaluate

  test = pipeline.scan(config, config.dataset.root, category, 'test')
  return evaluate.score_samples(config, model, state, {}, test, parallel.make_mesh())


def _btad_layout(src_root: str, dst_root: str) -> str:
  """One tiny category in BTAD's layout: train/ok, test/ok, test/ko, ground_truth/ko/<stem>.png."""
  cat = folder.list_categories(src_root)[0]
  src, dst = os.path.join(src_root, cat), os.path.join(dst_root, '01')
  shutil.copytree(os.path.join(src, 'train', 'good'), os.path.join(dst, 'train', 'ok'))
  shutil.copytree(os.path.join(src, 'test', 'good'), os.path.join(dst, 'test', 'ok'))
  os.makedirs(os.path.join(dst, 'test', 'ko'))
  os.makedirs(os.path.join(dst, 'ground_truth', 'ko'))
  for t in sorted(os.listdir(os.path.join(src, 'ground_truth'))):
    for name in sorted(os.listdir(os.path.join(src, 'test', t))):
      stem, ext = os.path.splitext(name)
      shutil.copy(os.path.join(src, 'test', t, name), os.path.join(dst, 'test', 'ko', f'{t}{stem}{ext}'))
      shutil.copy(
        os.path.join(src, 'ground_truth', t, f'{stem}_mask.png'),
        os.path.join(dst, 'ground_truth', 'ko', f'{t}{stem}.png'),
      )
  return dst_root


@pytest.mark.parametrize('variant', ['', pytest.param('paper', marks=pytest.mark.slow), 'btad'])
def test_config_one_step_through_harness(variant, tiny_dataset, tmp_path):
  root = _btad_layout(tiny_dataset, str(tmp_path / 'btad')) if variant == 'btad' else tiny_dataset
  config = tiny_vit_memae_config(root, variant)
  if variant:
    assert not config.dataset.unified and config.vit_memae.num_heads == 8
    assert config.optimizer.name == 'adam' and config.optimizer.learning_rate == 2e-4
    assert config.vit_memae.lambda_recon == 1.0 and config.vit_memae.lambda_ent == 0.001
  category = folder.resolve_categories(root, 'all')[0]
  model, state, _ = _train(config, tmp_path / 'run', [category])
  assert int(state.step) == 1
  assert jax.tree.leaves(state.batch_stats)
  assert 'memory' in state.params and 'coord_attention' in state.params
  if variant == 'paper':
    return  # Same code path as btad below; its scoring compile is skipped to save CI time.
  scored = _score(config, model, state, category)
  n = len(scored['labels'])
  assert scored['maps'].shape == (n, 64, 64) and np.all(np.isfinite(scored['maps']))
  assert np.all(scored['maps'] >= 0)
  if variant == 'btad':  # BTAD's ok/ko folders and same-stem masks were found.
    assert 0 < scored['labels'].sum() < n and scored['masks'][scored['labels'] == 1].any()


@pytest.mark.parametrize(
  'tag,memory,attention',
  [('base', False, False), ('mem', True, False), ('ca', False, True), ('full', True, True)],
)
def test_table6_ablation_tags(tag, memory, attention, tiny_dataset):
  from configs import vit_memae as cfg_module

  for variant in ('', 'paper'):
    c = cfg_module.get_config(f'{variant},{tag}')
    assert (c.vit_memae.use_memory, c.vit_memae.use_coord_attention) == (memory, attention)
  assert cfg_module.get_config('paper,base').vit_memae.width == 768
  assert cfg_module.get_config('paper').vit_memae.depth == 12  # ViT-B (Sec. 4.2: D = 768, default config).
  config = tiny_vit_memae_config(tiny_dataset, f'paper,{tag}')
  net = vit_memae.network(config.vit_memae, train.model_context(config, 1))
  x = jnp.zeros((2, 64, 64, 3))
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))
  assert ('memory' in variables['params']) == memory
  assert ('coord_attention' in variables['params']) == attention
  out, weights = jax.eval_shape(lambda v: net.apply(v, x, train=False), variables)
  assert out.shape == x.shape and (weights is not None) == memory
  if memory:
    assert weights.shape == (2, 4, 4, 2000)


def test_bad_patch_and_strides_are_rejected(tiny_dataset):
  config = tiny_vit_memae_config(tiny_dataset, **{'vit_memae.decoder_strides': (1, 1, 1, 2, 2, 2)})
  with pytest.raises(ValueError, match='multiply to patch_size'):
    train.build_model(config, 10)
  with pytest.raises(ValueError, match='vit_memae flag'):
    from configs import vit_memae as cfg_module

    cfg_module.get_config('paper,nope')


# --------------------------------------------------------------------------- learning


def _small_net_config(root: str, epochs: int, **overrides):
  """64x64, P=8 (an 8x8 feature map), a 2-block width-64 ViT and a thin decoder: seconds per epoch."""
  return tiny_vit_memae_config(
    root,
    **{
      'num_epochs': epochs,
      'log_every': 1000,
      'vit_memae.patch_size': 8,
      'vit_memae.width': 64,
      'vit_memae.depth': 2,
      'vit_memae.decoder_channels': (64, 64, 32, 32, 16, 16),
      'vit_memae.decoder_strides': (1, 1, 1, 2, 2, 2),
      **overrides,
    },
  )


@pytest.fixture(scope='module')
def small_dataset(tmp_path_factory) -> str:
  """weave and ring_seal at 64x64: 40 train, 8 good + 12 defect test images each (~2 s to generate)."""
  from jaxad.data import synthetic

  return synthetic.generate(
    str(tmp_path_factory.mktemp('vit_memae_small')),
    seed=0,
    image_size=64,
    num_train=40,
    num_test_good=8,
    num_test_defect=12,
    categories=('weave', 'ring_seal'),
    progress=False,
  )


def test_short_training_beats_chance_by_a_wide_margin(small_dataset, tmp_path):
  """Pixel AUROC and AUPRO on weave after 100 steps (20 epochs of 40 images, batch 8).

  Chance is 0.5 (pixel AUROC) and ~0 (AUPRO at 30% FPR: a random map averages 0.15). The 12 defect
  masks hold a few dozen independent sigma-2-smoothed map areas, so a map unrelated to the defects has
  an AUROC standard deviation of roughly 0.05: 0.72 is > 4 sd above chance. A few steps of training
  stay near chance, so the margin comes from the training, not from the raw image statistics.
  Measured values: docs/models/vit_memae.md.
  """
  config = _small_net_config(small_dataset, epochs=20)
  model, state, _ = _train(config, tmp_path / 'run', ['weave'])
  scored = _score(config, model, state, 'weave')
  result = metrics.compute_all(scored['scores'], scored['labels'], scored['maps'], scored['masks'])
  assert result['pixel_auroc'] > 0.72
  assert result['aupro'] > 0.4


# --------------------------------------------------------------------------- memory vs pasted defect


def _paste_dark_squares(images: np.ndarray, size: int, seed: int = 0):
  """Darkens one size x size square per image (x 0.4): a 'stain' whose mask is exact."""
  rng = np.random.default_rng(seed)
  out, masks = images.copy(), np.zeros(images.shape[:3], bool)
  n, h, w, _ = images.shape
  for i in range(n):
    y, x = rng.integers(h // 8, h - size - h // 8, size=2)
    masks[i, y : y + size, x : x + size] = True
  out[masks] *= 0.4
  return out, masks


@pytest.mark.slow
def test_memory_suppresses_a_pasted_defect_more_than_base(small_dataset, tmp_path):
  """Table 6 base vs base + M, same budget: the memory leaves more of a pasted stain in the residual.

  ring_seal (smooth infrared rings) at 64x64, 40 train images, 200 steps per model, seeds 0-7 (16
  trainings). Compared, as means over the seeds: the in-mask residual of a x0.4 darkened square, the
  residual outside it, and the fraction of the stain left (residual / paste energy, 0 = stain fully
  reconstructed, 1 = fully suppressed). The effect holds on average but not for every seed (7 of 8):
  at the paper's temperature-1 cosine addressing ~45 of the 100 items stay active with near-uniform
  weights, and the decoder's BatchNorm re-amplifies what differs, so the memory is a weak bottleneck
  at this scale; three seeds were too few to see it. Per-seed values: docs/models/vit_memae.md.
  """
  root = small_dataset
  results = {'base': [], 'memory': []}
  for seed in range(8):
    for name, use_memory in (('base', False), ('memory', True)):
      config = _small_net_config(
        root,
        epochs=40,
        seed=seed,
        **{'vit_memae.use_memory': use_memory, 'vit_memae.use_coord_attention': False},
      )
      _, state, _ = _train(config, tmp_path / f'{name}{seed}', ['ring_seal'])
      good = [t for t in pipeline.scan(config, root, 'ring_seal', 'test') if t.label == 0]
      source = pipeline.ImageSource(good, 64, 3)
      clean = np.stack([source[i]['image'] for i in range(len(source))])
      pasted, mask = _paste_dark_squares(clean, 14)
      net = vit_memae.network(config.vit_memae, train.model_context(config, 1))
      recon = np.asarray(jax.jit(lambda s, x: vit_memae.reconstruct(net, s, x))(state, pasted))
      residual = np.mean((pasted - recon) ** 2, axis=-1)
      energy = np.mean((pasted - clean) ** 2, axis=-1)
      results[name].append(
        (residual[mask].mean(), residual[~mask].mean(), residual[mask].mean() / energy[mask].mean())
      )
  base, memory = np.mean(results['base'], axis=0), np.mean(results['memory'], axis=0)
  assert memory[0] > 1.15 * base[0]  # In-mask residual.
  assert memory[2] > base[2] + 0.05  # Fraction of the stain left.
  assert memory[1] < 1.3 * base[1]  # Not by reconstructing everything worse.
