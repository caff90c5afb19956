"""ResNet-18/34/50 and Wide-ResNet-50-2 in Flax Linen (NHWC, frozen BatchNorm, eps 1e-5).

Names mirror timm/torchvision (``conv1, bn1, layer{1-4}_{i}/{conv1,bn1,conv2,bn2,conv3,bn3,
downsample_0,downsample_1}, fc``), so their state dicts convert key by key. The stride of a
bottleneck sits on its 3x3 conv (torchvision "v1.5", as in timm).

Feature maps follow timm ``features_only``: index 0 = stem activation (stride 2), 1..4 =
``layer1..layer4`` (strides 4, 8, 16, 32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .common import conv, frozen_bn

EPS = 1e-5
STRIDES = (2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  name: str
  bottleneck: bool
  layers: tuple[int, int, int, int]
  base_width: int = 64
  num_classes: int = 1000

  @property
  def expansion(self) -> int:
    return 4 if self.bottleneck else 1

  @property
  def channels(self) -> tuple[int, ...]:
    return (64,) + tuple(p * self.expansion for p in (64, 128, 256, 512))

  @property
  def strides(self) -> tuple[int, ...]:
    return STRIDES


SPECS = {
  'resnet18': ResNetSpec('resnet18', False, (2, 2, 2, 2)),
  'resnet34': ResNetSpec('resnet34', False, (3, 4, 6, 3)),
  'resnet50': ResNetSpec('resnet50', True, (3, 4, 6, 3)),
  'wide_resnet50_2': ResNetSpec('wide_resnet50_2', True, (3, 4, 6, 3), base_width=128),
}
ARCHS = tuple(SPECS)


class Block(nn.Module):
  planes: int
  stride: int
  downsample: bool
  bottleneck: bool
  base_width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    bn = lambda name: frozen_bn(name=name, eps=EPS, dtype=dt)  # noqa: E731
    shortcut = x
    if self.bottleneck:
      width = int(self.planes * (self.base_width / 64))
      out_ch = self.planes * 4
      y = nn.relu(bn('bn1')(conv(width, 1, name='conv1', dtype=dt)(x)))
      y = nn.relu(bn('bn2')(conv(width, 3, self.stride, name='conv2', dtype=dt)(y)))
      y = bn('bn3')(conv(out_ch, 1, name='conv3', dtype=dt)(y))
    else:
      out_ch = self.planes
      y = nn.relu(bn('bn1')(conv(out_ch, 3, self.stride, name='conv1', dtype=dt)(x)))
      y = bn('bn2')(conv(out_ch, 3, name='conv2', dtype=dt)(y))
    if self.downsample:
      shortcut = conv(out_ch, 1, self.stride, padding='VALID', name='downsample_0', dtype=dt)(x)
      shortcut = bn('downsample_1')(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Returns ``{feature index: NHWC map}`` for ``out_indices``, or logits if it is None."""

  spec: ResNetSpec
  out_indices: tuple[int, ...] | None = (0, 1, 2, 3, 4)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    sp, dt = self.spec, self.dtype
    logits = self.out_indices is None
    last = 4 if logits else max(self.out_indices)
    want = () if logits else self.out_indices
    x = x.astype(dt)
    x = conv(64, 7, 2, name='conv1', dtype=dt)(x)
    x = nn.relu(frozen_bn(name='bn1', eps=EPS, dtype=dt)(x))
    feats = {0: x} if 0 in want else {}
    if last == 0:
      return feats
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    in_ch = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), sp.layers)):
      stride = 1 if li == 0 else 2
      for bi in range(n):
        s = stride if bi == 0 else 1
        ds = bi == 0 and (s != 1 or in_ch != planes * sp.expansion)
        x = Block(planes, s, ds, sp.bottleneck, sp.base_width, dt, name=f'layer{li + 1}_{bi}')(x)
        in_ch = planes * sp.expansion
      if li + 1 in want:
        feats[li + 1] = x
      if li + 1 == last:
        break
    if not logits:
      return feats
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(sp.num_classes, dtype=dt, param_dtype=jnp.float32, name='fc')(x)


def is_head_key(key: str) -> bool:
  return key.split('.')[0] == 'fc'
