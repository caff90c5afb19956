"""`<model>.scan_blocks` and `tmirn.scan_scales`: scanned and unrolled layers give the same losses,
updates and scores on a fixed batch when the scanned model gets the unrolled weights
(layers.stack_block_params, tmirn.stack_scale_params)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import override

from configs import mask_vitgan as mask_vitgan_config
from configs import sivt as sivt_config
from configs import tmirn as tmirn_config
from configs import vit_memae as vit_memae_config
from jaxad import provenance, train
from jaxad.models import layers, mask_vitgan, tmirn


def _stacking(*names):
  """Unrolled params -> the scanned layout: `layers.stack_block_params` of each name."""

  def port(params):
    for name in names:
      params = layers.stack_block_params(params, name)
    return params

  return port


def _tmirn():
  c = tmirn_config.get_config()
  return override(
    c,
    **{
      'dataset.image_size': 64,
      'batch_size': 2,
      'tmirn.base_width': 4,
      'tmirn.disc_base_width': 4,
      'tmirn.vit_depth': 2,
      'tmirn.disc_vit_depth': 2,  # The gradient penalty differentiates D's scanned blocks twice.
      'tmirn.head_dim': 4,
      'tmirn.pool_tokens': 2,
      'tmirn.latent_dim': 8,
      'tmirn.ssim_filter_size': 3,
    },
  ), _stacking('block')


def _tmirn_scales():
  """`tmirn.scan_scales` (with the PVT blocks scanned on both sides): the encoders' shared levels."""
  config, _ = _tmirn()
  config.tmirn.scan_blocks = True
  return config, tmirn.stack_scale_params


def _sivt():
  c = sivt_config.get_config()
  return override(
    c,
    **{
      'batch_size': 2,
      'backbone.weights': 'random',
      'sivt.feature_size': 8,
      'sivt.width': 32,
      'sivt.encoder_depth': 3,
      'sivt.decoder_depth': 2,
      'sivt.num_heads': 2,
    },
  ), _stacking('encoder', 'decoder')


def _vit_memae():
  c = vit_memae_config.get_config()
  return override(
    c,
    **{
      'dataset.image_size': 32,
      'batch_size': 2,
      'vit_memae.width': 32,
      'vit_memae.depth': 3,
      'vit_memae.num_heads': 2,
      'vit_memae.num_memory': 10,
      'vit_memae.decoder_channels': (8, 8, 8, 8, 8, 8),
      'vit_memae.ssim_filter_size': 3,
    },
  ), _stacking('block')


def _mask_vitgan(long_skips=True):
  c = mask_vitgan_config.get_config()
  return override(
    c,
    **{
      'dataset.image_size': 32,
      'batch_size': 2,
      'mask_vitgan.depth': 5,
      'mask_vitgan.width': 32,
      'mask_vitgan.num_heads': 2,
      'mask_vitgan.long_skips': long_skips,
      'mask_vitgan.disc_depth': 1,
      'mask_vitgan.disc_width': 32,
      'mask_vitgan.disc_feature_dim': 16,
      'mask_vitgan.mask_cells': (2, 4),
      'mask_vitgan.select': 'mean',  # Eq. 8's mu_i comes from the harness's reference pass.
    },
  ), mask_vitgan.scanned_layout


def _states(state):
  """The TrainStates of a model state (a TrainState or a dict of them), by name."""
  return state if isinstance(state, dict) else {'': state}


def _to_scanned(unrolled, scanned, port):
  """`scanned` (a fresh scanned-layout state) holding `unrolled`'s weights and statistics."""
  out = {}
  for key, ts in _states(scanned).items():
    src = _states(unrolled)[key]
    params = port(src.params)
    assert jax.tree.structure(params) == jax.tree.structure(ts.params)
    new = ts.replace(params=params, opt_state=ts.tx.init(params))
    if hasattr(src, 'batch_stats'):
      new = new.replace(batch_stats=port(src.batch_stats))
    out[key] = new
  return out if isinstance(scanned, dict) else out['']


def _ported_params(state, port):
  return {key: port(ts.params) for key, ts in _states(state).items()}


@pytest.mark.parametrize(
  'make_config, switch',
  [
    # Compiles the GAN step with its gradient penalty twice (scanned and unrolled): minutes on 2 cores.
    pytest.param(_tmirn, 'scan_blocks', marks=pytest.mark.slow, id='tmirn'),
    pytest.param(_tmirn_scales, 'scan_scales', marks=pytest.mark.slow, id='tmirn_scales'),
    pytest.param(_sivt, 'scan_blocks', id='sivt'),
    pytest.param(_vit_memae, 'scan_blocks', marks=pytest.mark.slow, id='vit_memae'),
    pytest.param(_mask_vitgan, 'scan_blocks', id='mask_vitgan'),
    pytest.param(
      lambda: _mask_vitgan(long_skips=False),
      'scan_blocks',
      marks=pytest.mark.slow,
      id='mask_vitgan_no_long_skips',
    ),
  ],
)
def test_scanned_blocks_equal_unrolled(make_config, switch):
  config, port = make_config()
  rng = np.random.default_rng(0)
  models = {}
  for scan in (False, True):
    c, _ = make_config()
    c[c.model.name][switch] = scan
    models[scan] = train.build_model(c, total_steps=10)
  model = models[False]
  size, channels = config.dataset.image_size, config.dataset.channels
  batch = {'image': jnp.asarray(rng.uniform(0, 1, (2, size, size, channels)), jnp.float32)}
  if model.precompute is not None:
    batch = {'image': batch['image'], **model.precompute(batch, model.frozen)}
  init_key, step_key = jax.random.split(jax.random.key(1))
  unrolled = model.init(init_key, batch, model.frozen)
  scanned = _to_scanned(unrolled, models[True].init(init_key, batch, models[True].frozen), port)
  # The scanned layout is a stack: fewer top-level entries, one leading axis per stacked block.
  assert len(jax.tree.leaves(scanned)) < len(jax.tree.leaves(unrolled))

  results = {}
  for scan, state in ((False, unrolled), (True, scanned)):
    m = models[scan]
    new_state, step_metrics = jax.jit(m.train_step)(state, batch, step_key, m.frozen)
    maps, scores = jax.jit(m.score)(new_state, batch, m.frozen)
    results[scan] = (step_metrics, _ported_params(new_state, port), maps, scores)
  (m0, p0, maps0, s0), (m1, p1, maps1, s1) = results[False], results[True]
  assert set(m0) == set(m1)
  for k in m0:
    np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), rtol=2e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), p0, p1)
  np.testing.assert_allclose(np.asarray(maps1), np.asarray(maps0), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s1), np.asarray(s0), rtol=2e-5, atol=1e-6)


def test_stack_block_params_stacks_numbered_blocks_only():
  params = {
    'encoder_0': {'w': jnp.zeros(2)},
    'encoder_1': {'w': jnp.ones(2)},
    'encoder_norm': {'scale': jnp.ones(3)},
    'inner': {'encoder_0': {'w': jnp.full(2, 5.0)}},
  }
  out = layers.stack_block_params(params, 'encoder')
  assert sorted(out) == ['encoder', 'encoder_norm', 'inner']
  np.testing.assert_array_equal(out['encoder']['w'], [[0, 0], [1, 1]])
  np.testing.assert_array_equal(out['inner']['encoder']['w'], [[5, 5]])
  with pytest.raises(ValueError, match='not numbered'):
    layers.stack_block_params({'encoder_0': {'w': 0}, 'encoder_2': {'w': 1}}, 'encoder')


def test_a_run_in_the_other_parameter_layout_is_refused_with_the_flag_to_pass(tmp_path):
  """Checkpoints of one layout cannot be restored into the other: even allow_config_change refuses, and
  a record from before the switch existed counts as unrolled."""
  path = str(tmp_path / 'config.json')
  config, _ = _sivt()
  config.allow_config_change = True
  old = provenance.flat_config(config)
  del old['sivt.scan_blocks']  # A record written before the switch existed.
  with open(path, 'w') as f:
    json.dump({'config': old, 'data': {}}, f)
  current = {'config': provenance.flat_config(config), 'data': {}}
  assert config.sivt.scan_blocks
  with pytest.raises(provenance.ConfigMismatch, match=r'--config\.sivt\.scan_blocks=False'):
    provenance.check_rerun(path, current, config)
  config.sivt.scan_blocks = False
  assert provenance.check_rerun(path, {'config': provenance.flat_config(config), 'data': {}}, config) == {}


def test_a_record_from_before_added_fields_reruns_and_loads_with_the_values_it_was_trained_with(tmp_path):
  """Fields added since a run was recorded read as the value that reproduces it: a rerun with those
  values is no change, another value is, and `load_config_record` fills them in."""
  from jaxad import calibration

  config, _ = _sivt()
  config.sivt.scan_blocks = False  # The values that a record without the added fields implies.
  config.augment.rot90 = False
  old = provenance.flat_config(config)
  implied = provenance.implied_fields('sivt')
  assert {'num_seeds', 'optimizer.l2_weight_decay', 'sivt.image_score_map', 'sivt.scan_blocks'} <= set(
    implied
  )
  for field in implied:
    del old[field]
  (tmp_path / 'config.json').write_text(json.dumps({'config': old, 'data': {}}))
  current = {'config': provenance.flat_config(config), 'data': {}}
  assert provenance.check_rerun(str(tmp_path / 'config.json'), current, config) == {}
  config.optimizer.l2_weight_decay = 1e-5
  with pytest.raises(provenance.ConfigMismatch, match='optimizer.l2_weight_decay'):
    provenance.check_rerun(
      str(tmp_path / 'config.json'), {'config': provenance.flat_config(config), 'data': {}}, config
    )
  loaded = calibration.load_config_record(str(tmp_path))
  assert loaded.num_seeds == 1 and loaded.optimizer.l2_weight_decay == 0.0
  assert loaded.sivt.image_score_map == 'smoothed' and loaded.sivt.scan_blocks is False
