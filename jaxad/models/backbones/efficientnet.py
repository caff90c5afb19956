"""EfficientNet B0-B4 and EfficientNet-Lite 0-4 in Flax Linen (NHWC, frozen BatchNorm).

Layer names mirror timm's ``efficientnet_*`` / ``tf_efficientnet_*`` so timm state dicts
convert key by key (see :func:`jaxad.models.backbones.common.torch_name`):
``conv_stem, bn1, blocks_{s}_{i}/{conv_dw,bn1,se/{conv_reduce,conv_expand},conv_pw,bn2,conv_pwl,bn3},
conv_head, bn2, classifier``.

* ``tf_`` variants: TF 'SAME' padding (== JAX ``padding='SAME'``) and BN eps 1e-3;
* the others: symmetric torch padding ``k//2`` and BN eps 1e-5.
* Lite: ReLU6, no squeeze-excite, stem (32) / head (1280) and first/last stage depth unscaled.

Feature maps follow timm ``features_only``: index 0..4 = outputs of stages 0, 1, 2, 4, 6
(strides 2, 4, 8, 16, 32). Only the stages up to the deepest requested index are built.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .common import DepthwiseConv, conv, frozen_bn

# (block type, repeats, kernel, stride, expansion, out channels) of the B0 / Lite0 base
_BASE_STAGES = (
  ('ds', 1, 3, 1, 1, 16),
  ('ir', 2, 3, 2, 6, 24),
  ('ir', 2, 5, 2, 6, 40),
  ('ir', 3, 3, 2, 6, 80),
  ('ir', 3, 5, 1, 6, 112),
  ('ir', 4, 5, 2, 6, 192),
  ('ir', 1, 3, 1, 6, 320),
)
FEATURE_STAGES = (0, 1, 2, 4, 6)
FEATURE_STRIDES = (2, 4, 8, 16, 32)

# (channel multiplier, depth multiplier)
_SCALES = {
  'b0': (1.0, 1.0),
  'b1': (1.0, 1.1),
  'b2': (1.1, 1.2),
  'b3': (1.2, 1.4),
  'b4': (1.4, 1.8),
  'lite0': (1.0, 1.0),
  'lite1': (1.0, 1.1),
  'lite2': (1.1, 1.2),
  'lite3': (1.2, 1.4),
  'lite4': (1.4, 1.8),
}

ARCHS = tuple(f'{p}efficientnet_{v}' for p in ('', 'tf_') for v in _SCALES)


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  kind: str  # 'ds' (depthwise separable) or 'ir' (inverted residual)
  in_ch: int
  out_ch: int
  kernel: int
  stride: int
  expand: int
  se_ch: int  # 0: no squeeze-excite

  @property
  def mid_ch(self) -> int:
    return self.in_ch * self.expand if self.kind == 'ir' else self.in_ch

  @property
  def skip(self) -> bool:
    return self.stride == 1 and self.in_ch == self.out_ch


@dataclasses.dataclass(frozen=True)
class EfficientNetSpec:
  name: str
  lite: bool
  tf: bool
  stem_ch: int
  head_ch: int
  stages: tuple[tuple[BlockSpec, ...], ...]
  num_classes: int = 1000

  @property
  def eps(self) -> float:
    return 1e-3 if self.tf else 1e-5

  @property
  def channels(self) -> tuple[int, ...]:
    return tuple(self.stages[s][-1].out_ch for s in FEATURE_STAGES)

  @property
  def strides(self) -> tuple[int, ...]:
    return FEATURE_STRIDES


def spec(arch: str) -> EfficientNetSpec:
  m = re.fullmatch(r'(tf_)?efficientnet_(b[0-4]|lite[0-4])', arch)
  if not m:
    raise ValueError(f'unknown EfficientNet architecture {arch!r}; known: {", ".join(ARCHS)}')
  tf, variant = bool(m.group(1)), m.group(2)
  lite = variant.startswith('lite')
  wm, dm = _SCALES[variant]
  stem = 32 if lite else make_divisible(32 * wm)
  head = 1280 if lite else make_divisible(1280 * wm)
  stages = []
  in_ch = stem
  last = len(_BASE_STAGES) - 1
  for si, (kind, reps, k, s, e, c) in enumerate(_BASE_STAGES):
    n = reps if (lite and si in (0, last)) else int(math.ceil(reps * dm))
    out_ch = make_divisible(c * wm)
    blocks = []
    for i in range(n):
      # timm: SqueezeExcite(mid_chs, rd_ratio=0.25 / exp_ratio), rd = round(mid * ratio)
      mid = in_ch * e if kind == 'ir' else in_ch
      se = 0 if lite else round(mid * (0.25 / e if kind == 'ir' else 0.25))
      blocks.append(BlockSpec(kind, in_ch, out_ch, k, s if i == 0 else 1, e, se))
      in_ch = out_ch
    stages.append(tuple(blocks))
  return EfficientNetSpec(arch, lite, tf, stem, head, tuple(stages))


class SqueezeExcite(nn.Module):
  reduce_ch: int
  act: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = conv(self.reduce_ch, 1, bias=True, name='conv_reduce', dtype=self.dtype)(s)
    s = self.act(s)
    s = conv(x.shape[-1], 1, bias=True, name='conv_expand', dtype=self.dtype)(s)
    return x * jax.nn.sigmoid(s)


class MBBlock(nn.Module):
  """timm ``DepthwiseSeparableConv`` ('ds') or ``InvertedResidual`` ('ir')."""

  block: BlockSpec
  tf: bool
  eps: float
  act: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, dt = self.block, self.dtype
    pad = 'SAME' if self.tf else None
    bn = lambda name: frozen_bn(name=name, eps=self.eps, dtype=dt)  # noqa: E731
    shortcut = x
    if b.kind == 'ds':
      x = DepthwiseConv(b.kernel, b.stride, pad, dt, name='conv_dw')(x)
      x = self.act(bn('bn1')(x))
      if b.se_ch:
        x = SqueezeExcite(b.se_ch, self.act, dt, name='se')(x)
      x = conv(b.out_ch, 1, padding=pad, name='conv_pw', dtype=dt)(x)
      x = bn('bn2')(x)
    else:
      x = conv(b.mid_ch, 1, padding=pad, name='conv_pw', dtype=dt)(x)
      x = self.act(bn('bn1')(x))
      x = DepthwiseConv(b.kernel, b.stride, pad, dt, name='conv_dw')(x)
      x = self.act(bn('bn2')(x))
      if b.se_ch:
        x = SqueezeExcite(b.se_ch, self.act, dt, name='se')(x)
      x = conv(b.out_ch, 1, padding=pad, name='conv_pwl', dtype=dt)(x)
      x = bn('bn3')(x)
    if b.skip:
      x = x + shortcut
    return x


class EfficientNet(nn.Module):
  """Returns ``{feature index: NHWC map}`` for ``out_indices``, or logits if it is None."""

  spec: EfficientNetSpec
  out_indices: tuple[int, ...] | None = (0, 1, 2, 3, 4)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    sp, dt = self.spec, self.dtype
    act = jax.nn.relu6 if sp.lite else jax.nn.silu
    pad = 'SAME' if sp.tf else None
    logits = self.out_indices is None
    last_stage = len(sp.stages) - 1 if logits else FEATURE_STAGES[max(self.out_indices)]
    x = x.astype(dt)
    x = conv(sp.stem_ch, 3, 2, padding=pad, name='conv_stem', dtype=dt)(x)
    x = act(frozen_bn(name='bn1', eps=sp.eps, dtype=dt)(x))
    feats = {}
    for si, stage in enumerate(sp.stages[: last_stage + 1]):
      for bi, blk in enumerate(stage):
        x = MBBlock(blk, sp.tf, sp.eps, act, dt, name=f'blocks_{si}_{bi}')(x)
      if not logits and si in FEATURE_STAGES:
        idx = FEATURE_STAGES.index(si)
        if idx in self.out_indices:
          feats[idx] = x
    if not logits:
      return feats
    x = conv(sp.head_ch, 1, padding=pad, name='conv_head', dtype=dt)(x)
    x = act(frozen_bn(name='bn2', eps=sp.eps, dtype=dt)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(sp.num_classes, dtype=dt, param_dtype=jnp.float32, name='classifier')(x)


def is_head_key(key: str) -> bool:
  return key.split('.')[0] in ('conv_head', 'bn2', 'classifier')


# ----------------------------------------------------------------------------- lukemelas keys

_LUKE_TOP = {
  '_conv_stem': 'conv_stem',
  '_bn0': 'bn1',
  '_conv_head': 'conv_head',
  '_bn1': 'bn2',
  '_fc': 'classifier',
}
_LUKE_DS = {
  '_depthwise_conv': 'conv_dw',
  '_bn1': 'bn1',
  '_project_conv': 'conv_pw',
  '_bn2': 'bn2',
  '_se_reduce': 'se.conv_reduce',
  '_se_expand': 'se.conv_expand',
}
_LUKE_IR = {
  '_expand_conv': 'conv_pw',
  '_bn0': 'bn1',
  '_depthwise_conv': 'conv_dw',
  '_bn1': 'bn2',
  '_project_conv': 'conv_pwl',
  '_bn2': 'bn3',
  '_se_reduce': 'se.conv_reduce',
  '_se_expand': 'se.conv_expand',
}


def is_lukemelas(state_dict) -> bool:
  return any(k.startswith('_blocks.') or k.startswith('_conv_stem.') for k in state_dict)


def lukemelas_to_timm(state_dict: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
  """Rename lukemelas/``efficientnet_pytorch``-style keys (``_blocks.N._expand_conv``...)
  to timm's (``blocks.{stage}.{i}.conv_pw``...). Flat block N is placed by the stage
  repeats of ``arch``; keys that do not fit are kept verbatim so the strict check lists them.
  """
  sp = spec(arch)
  place = [(si, bi, blk) for si, st in enumerate(sp.stages) for bi, blk in enumerate(st)]
  out = {}
  for key, v in state_dict.items():
    parts = key.split('.')
    new = None
    if parts[0] in _LUKE_TOP and len(parts) == 2:
      new = f'{_LUKE_TOP[parts[0]]}.{parts[1]}'
    elif parts[0] == '_blocks' and len(parts) == 4 and parts[1].isdigit():
      n = int(parts[1])
      if n < len(place):
        si, bi, blk = place[n]
        table = _LUKE_DS if blk.kind == 'ds' else _LUKE_IR
        if parts[2] in table:
          new = f'blocks.{si}.{bi}.{table[parts[2]]}.{parts[3]}'
    out[new if new is not None else key] = v
  return out
