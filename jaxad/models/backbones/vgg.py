"""VGG-11/13/16/19 with and without BatchNorm in Flax Linen (NHWC).

Module names are timm's / torchvision's ``features.N`` indices (``features_N`` here), so
their state dicts convert key by key; torchvision's ``classifier.{0,3,6}`` keys are renamed
to timm's ``pre_logits.fc1`` (a 7x7 conv), ``pre_logits.fc2`` (1x1 conv) and ``head.fc``.

Feature maps follow timm ``features_only`` (6 of them): indices 0..4 are the ReLU outputs
before each max-pool (strides 1, 2, 4, 8, 16), index 5 the last max-pool (stride 32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .common import conv, frozen_bn

EPS = 1e-5
CFGS = {
  'vgg11': (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
  'vgg13': (64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
  'vgg16': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'),
  'vgg19': (
    64,
    64,
    'M',
    128,
    128,
    'M',
    256,
    256,
    256,
    256,
    'M',
    512,
    512,
    512,
    512,
    'M',
    512,
    512,
    512,
    512,
    'M',
  ),
}
STRIDES = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class VGGSpec:
  name: str
  cfg: tuple
  bn: bool
  num_classes: int = 1000

  @property
  def channels(self) -> tuple[int, ...]:
    chs = [self.cfg[i - 1] for i, v in enumerate(self.cfg) if v == 'M']
    return tuple(chs) + (chs[-1],)

  @property
  def strides(self) -> tuple[int, ...]:
    return STRIDES

  def conv_indices(self) -> list[int]:
    """torch ``features`` index of every conv, in order."""
    out, idx = [], 0
    for v in self.cfg:
      if v == 'M':
        idx += 1
      else:
        out.append(idx)
        idx += 3 if self.bn else 2
    return out


SPECS = {
  f'{n}{"_bn" if bn else ""}': VGGSpec(f'{n}{"_bn" if bn else ""}', cfg, bn)
  for n, cfg in CFGS.items()
  for bn in (False, True)
}
ARCHS = tuple(SPECS)


class ConvMlp(nn.Module):
  """timm ``pre_logits``: 7x7 conv (VALID) -> ReLU -> 1x1 conv -> ReLU."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.shape[1] < 7 or x.shape[2] < 7:
      raise ValueError(f'VGG logits need inputs of at least 224x224 (stride-32 map {x.shape[1:3]})')
    x = nn.relu(conv(4096, 7, padding='VALID', bias=True, name='fc1', dtype=self.dtype)(x))
    return nn.relu(conv(4096, 1, padding='VALID', bias=True, name='fc2', dtype=self.dtype)(x))


class VGG(nn.Module):
  """Returns ``{feature index: NHWC map}`` for ``out_indices``, or logits if it is None."""

  spec: VGGSpec
  out_indices: tuple[int, ...] | None = (0, 1, 2, 3, 4, 5)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    sp, dt = self.spec, self.dtype
    logits = self.out_indices is None
    want = () if logits else self.out_indices
    last = 5 if logits else max(want)
    x = x.astype(dt)
    feats, idx, level = {}, 0, 0
    for v in sp.cfg:
      if v == 'M':
        if level in want:
          feats[level] = x
        if level == last:
          return feats
        x = nn.max_pool(x, (2, 2), (2, 2))
        level += 1
        idx += 1
        continue
      x = conv(v, 3, padding=((1, 1), (1, 1)), bias=True, name=f'features_{idx}', dtype=dt)(x)
      idx += 1
      if sp.bn:
        x = frozen_bn(name=f'features_{idx}', eps=EPS, dtype=dt)(x)
        idx += 1
      x = nn.relu(x)
      idx += 1
    if not logits:
      feats[5] = x
      return feats
    x = ConvMlp(dt, name='pre_logits')(x)
    x = jnp.mean(x, axis=(1, 2))
    return _Head(sp.num_classes, dt, name='head')(x)


class _Head(nn.Module):
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='fc')(x)


def is_head_key(key: str) -> bool:
  return key.split('.')[0] in ('pre_logits', 'head')


def torchvision_to_timm(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision ``classifier.{0,3,6}`` Linear keys -> timm ``pre_logits``/``head`` keys."""
  out = {}
  for k, v in state_dict.items():
    if k.startswith('classifier.0.'):
      k = 'pre_logits.fc1.' + k.split('.')[-1]
      v = np.reshape(v, (-1, 512, 7, 7)) if k.endswith('weight') else v
    elif k.startswith('classifier.3.'):
      k = 'pre_logits.fc2.' + k.split('.')[-1]
      v = np.reshape(v, (-1, 4096, 1, 1)) if k.endswith('weight') else v
    elif k.startswith('classifier.6.'):
      k = 'head.fc.' + k.split('.')[-1]
    out[k] = v
  return out
