"""The embedded default dataset: procedurally generated industrial inspection images.

Every image is a pure function of (seed, category, split, index): it is drawn
from its own ``np.random.default_rng`` stream, so any file can be regenerated
on its own. ``split`` is ``'train'`` or a test folder ``'test/<type>'``
(``'test/good'`` for normal test images). The dataset is written once in
MVTec-AD layout (read it with :mod:`jaxad.data.folder`).

Categories:

* ``weave``: denim-like 2/2 twill (periodic texture; jittered period, angle, phase).
* ``marble``: veined stone from filtered noise (stochastic texture).
* ``screw_plate``: brushed plate with four cross-head screws, random pose.
* ``connector``: black connector housing with six gold pins, random pose.
* ``ring_seal``: single-channel infrared view of an induction-sealed cap: a warm
  ring (the bottle rim under the foil) with thermal falloff and sensor noise,
  as in the TMIRN aluminium-foil-sealing data.

Defect masks are exact: a mask pixel is set iff the stored defective image
differs from the same image rendered without the defect
(``render(..., clean=True)``).

Defect sizes (generator version 2): the median mask area is 1.0 % of the image
(0.26-6 %; real MVTec AD bottle defects: 5.7 %), so most defects span several
feature cells of a stride-8 CNN at 128x128, and marble keeps hard cases. Version
1's defects (median 0.4 %) mostly fell within one cell, where even a
nearest-neighbour patch memory on ImageNet features hardly saw them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import uuid
import zlib

import numpy as np
from PIL import Image
from scipy import ndimage

import jaxad

VERSION = 2
CATEGORIES = ('weave', 'marble', 'screw_plate', 'connector', 'ring_seal')
DEFECT_TYPES = {
  'weave': ('hole', 'stain', 'pulled_thread', 'misweave'),
  'marble': ('crack', 'chip', 'stain', 'scratch'),
  'screw_plate': ('missing_screw', 'misplaced_screw', 'scratch', 'stain'),
  'connector': ('missing_pin', 'bent_pin', 'contamination', 'crack'),
  'ring_seal': ('broken_ring', 'missing_foil', 'off_centre', 'thermal_spot'),
}
GRAYSCALE = frozenset({'ring_seal'})
AREA_RANGE = (0.0025, 0.10)  # defect mask area as a fraction of the image
_THRESHOLD = 3.0 / 255.0  # a pixel belongs to the defect if it moved more
_MAX_TRIES = 40


# ----------------------------------------------------------------------------
# Small drawing helpers (float32 images in [0, 1]).


def _rng(seed: int, category: str, split: str, index: int):
  key = [int(seed), zlib.crc32(category.encode()), zlib.crc32(split.encode()), int(index), VERSION]
  return np.random.default_rng(key)


@functools.lru_cache(maxsize=8)
def _grid(size: int):
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  yy.flags.writeable = False
  xx.flags.writeable = False
  return yy, xx


def _noise(rng, size: int, cell: float) -> np.ndarray:
  """Smooth zero-mean unit-std noise with features of about `cell` pixels."""
  n = max(2, int(np.ceil(size / max(cell, 1.0)))) + 2
  g = rng.standard_normal((n, n), dtype=np.float32)
  a = np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC))
  a = a - a.mean()
  return a / (a.std() + 1e-6)


def _grain(rng, size: int, sigma) -> np.ndarray:
  """Fine (optionally anisotropic) noise, unit std."""
  g = rng.standard_normal((size, size), dtype=np.float32)
  g = ndimage.gaussian_filter(g, sigma, mode='wrap')
  return g / (g.std() + 1e-6)


def _sigmoid(x):
  return 0.5 + 0.5 * np.tanh(0.5 * x)


def _cov(sdf, soft: float = 1.0):
  """Antialiased coverage of a signed distance field (pixels, <0 inside)."""
  return np.clip(0.5 - sdf / soft, 0.0, 1.0)


def _sd_box(u, v, hx, hy, r=0.0):
  qx = np.abs(u) - (hx - r)
  qy = np.abs(v) - (hy - r)
  outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
  return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _sd_segment(u, v, ax, ay, bx, by, r):
  dx, dy = bx - ax, by - ay
  t = np.clip(((u - ax) * dx + (v - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
  return np.hypot(u - ax - t * dx, v - ay - t * dy) - r


def _lerp(img, color, alpha):
  """In place: img <- img * (1 - alpha) + color * alpha."""
  color = np.asarray(color, np.float32)
  if img.ndim == 3:
    alpha = alpha[..., None]
  img += (color - img) * alpha
  return img


def _window(size, cx, cy, r):
  y0, y1 = int(max(0, np.floor(cy - r))), int(min(size, np.ceil(cy + r) + 1))
  x0, x1 = int(max(0, np.floor(cx - r))), int(min(size, np.ceil(cx + r) + 1))
  return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _curve(rng, size, length, *, start=None, bend=1.0, jag=0.0, n=24):
  """Points (n+1, 2) of a smooth random curve (x, y) of the given length."""
  if start is None:
    start = rng.uniform(0.15 * size, 0.85 * size, 2)
  heading = rng.uniform(0, 2 * np.pi)
  turn = rng.uniform(-bend, bend) * np.linspace(0, 1, n)
  wiggle = np.cumsum(rng.normal(0, jag, n)) if jag else 0.0
  h = heading + turn + wiggle
  steps = (length / n) * np.stack([np.cos(h), np.sin(h)], -1)
  pts = np.concatenate([[start], start + np.cumsum(steps, 0)])
  return pts - (pts.mean(0) - start)  # centre the curve on `start`


def _polyline_alpha(size, pts, width, taper=True):
  """Antialiased alpha of a polyline of (tapered) width."""
  pad = width + 2
  lo = np.floor(pts.min(0) - pad).astype(int)
  hi = np.ceil(pts.max(0) + pad).astype(int)
  sl = (slice(max(lo[1], 0), min(hi[1], size)), slice(max(lo[0], 0), min(hi[0], size)))
  out = np.zeros((size, size), np.float32)
  yy, xx = _grid(size)
  yy, xx = yy[sl], xx[sl]
  if yy.size == 0:
    return out
  n = len(pts) - 1
  t = (np.arange(n) + 0.5) / n
  widths = width * (np.sin(np.pi * t) ** 0.35 if taper else np.ones(n))
  alpha = np.zeros(yy.shape, np.float32)
  for k in range(n):
    d = _sd_segment(xx, yy, *map(float, pts[k]), *map(float, pts[k + 1]), float(widths[k]) / 2)
    np.maximum(alpha, _cov(d), out=alpha)
  out[sl] = alpha
  return out


def _blob_alpha(rng, size, cx, cy, radius, *, aspect=(0.55, 1.0), rough=0.2, edge=1.0):
  """Alpha of an irregular blob (radius modulated by a few harmonics)."""
  ang = rng.uniform(0, np.pi)
  asp = rng.uniform(*aspect)
  ks = np.arange(2, 6)
  amps = rough * rng.uniform(0.3, 1.0, len(ks)) / ks * 2
  phases = rng.uniform(0, 2 * np.pi, len(ks))
  r_max = radius * (1 + amps.sum()) + 3 * edge + 2
  sl = _window(size, cx, cy, r_max)
  out = np.zeros((size, size), np.float32)
  yy, xx = _grid(size)
  dx, dy = xx[sl] - cx, yy[sl] - cy
  u = dx * math.cos(ang) + dy * math.sin(ang)
  v = (-dx * math.sin(ang) + dy * math.cos(ang)) / asp
  r = np.hypot(u, v)
  th = np.arctan2(v, u)
  rad = radius * (
    1 + sum(a * np.cos(k * th + p) for a, k, p in zip(amps.tolist(), ks.tolist(), phases.tolist()))
  )
  out[sl] = np.clip((rad - r) / edge + 0.5, 0, 1)
  return out


def _shade_from_alpha(alpha, light=(-0.7, -0.7), strength=0.35):
  """Relief shading of a depression described by `alpha` (1 inside)."""
  gy, gx = np.gradient(ndimage.gaussian_filter(alpha, 0.8))
  return 1.0 - strength * (gx * light[0] + gy * light[1])


def _rgb(values):
  return np.asarray(values, np.float32)


def _tint(rng):
  """A random stain colour (multiplicative tint)."""
  kind = rng.integers(3)
  if kind == 0:  # oil: dark brown
    return _rgb([0.45, 0.38, 0.28]) * rng.uniform(0.8, 1.1)
  if kind == 1:  # rust
    return _rgb([0.95, 0.55, 0.30]) * rng.uniform(0.8, 1.0)
  hue = rng.uniform(0, 1, 3)  # dye / coolant
  return (0.35 + 0.6 * hue / hue.max()).astype(np.float32)


def _stain(rng, size, img, where, radius):
  """`img` with a soft coloured blob placed inside `where`."""
  cx, cy = _pick_point(rng, where, margin=radius * 0.6)
  a = _blob_alpha(rng, size, cx, cy, radius, rough=0.3, edge=rng.uniform(1.5, 5))
  a *= rng.uniform(0.45, 0.8) * (0.8 + 0.2 * np.clip(_noise(rng, size, 6), -2, 2) / 2)
  a *= where
  tint = _tint(rng).astype(np.float32)
  if img.ndim == 2:
    tint = np.float32(tint.mean())
    return img * (1 - a * (1 - tint))
  return img * (1 - a[..., None] * (1 - tint))


def _pick_point(rng, where, margin=0.0):
  """A random pixel (x, y) with where > 0.5, preferring `margin` from its edge."""
  size = where.shape[0]
  m = where > 0.5
  if margin > 1:
    inner = ndimage.binary_erosion(m, iterations=int(min(margin, size // 4)))
    if inner.any():
      m = inner
  idx = np.flatnonzero(m)
  if idx.size == 0:
    return size / 2, size / 2
  i = idx[rng.integers(idx.size)]
  return float(i % size), float(i // size)


# ----------------------------------------------------------------------------
# Categories. Each `_make_<category>(rng, size)` draws the scene parameters and
# returns (clean float image, defect(kind, rng) -> defective float image).


def _make_weave(rng, size):
  k = size / 256
  p = 10.5 * k * rng.uniform(0.95, 1.05)
  ang = np.deg2rad(rng.uniform(-3.0, 3.0))
  phase = rng.uniform(0, 4 * p, 2).tolist()
  warp_col = _rgb(np.array([0.27, 0.36, 0.56]) * rng.uniform(0.95, 1.05) + rng.normal(0, 0.01, 3))  # indigo
  weft_col = _rgb(np.array([0.70, 0.69, 0.64]) * rng.uniform(0.95, 1.05) + rng.normal(0, 0.01, 3))  # undyed
  gi = 1 + 0.07 * rng.standard_normal(97, dtype=np.float32)
  gj = 1 + 0.07 * rng.standard_normal(97, dtype=np.float32)
  nw = _grain(rng, size, (2.5 * k, 0.5))  # fibres along the warp
  nf = _grain(rng, size, (0.5, 2.5 * k))  # fibres along the weft
  illum = 1 + 0.05 * _noise(rng, size, size / 2)
  yy, xx = _grid(size)
  u = (xx * math.cos(ang) + yy * math.sin(ang) + phase[0]) / p
  v = (-xx * math.sin(ang) + yy * math.cos(ang) + phase[1]) / p
  i = np.floor(u).astype(np.int64)
  j = np.floor(v).astype(np.int64)
  fu, fv = (u - i).astype(np.float32), (v - j).astype(np.float32)
  pu, pv = np.sin(np.pi * fu), np.sin(np.pi * fv)

  def draw(reverse=None, taut=None):
    phase_ij = np.mod(i + j, 4)
    if reverse is not None:
      phase_ij = np.where(reverse, np.mod(i - j, 4), phase_ij)
    over = phase_ij < 2  # warp thread on top (2/2 twill)
    along_w = (phase_ij + fv) / 2
    along_f = (phase_ij - 2 + fu) / 2
    warp = gi[np.mod(i, 97)] * (0.3 + 0.7 * pu**0.7) * (0.86 + 0.14 * np.sin(np.pi * np.clip(along_w, 0, 1)))
    weft = gj[np.mod(j, 97)] * (0.3 + 0.7 * pv**0.7) * (0.86 + 0.14 * np.sin(np.pi * np.clip(along_f, 0, 1)))
    if taut is not None:  # a pulled thread floats on top, taut and shiny
      over = over | taut
      warp = np.where(taut, gi[np.mod(i, 97)] * 1.1 * (0.35 + 0.75 * pu**0.6), warp)
    warp = warp[..., None] * warp_col * (1 + 0.12 * nw[..., None])
    weft = weft[..., None] * weft_col * (1 + 0.12 * nf[..., None])
    img = np.where(over[..., None], warp, weft) * illum[..., None]
    return ndimage.gaussian_filter(img.astype(np.float32), (0.5, 0.5, 0))

  clean = draw()
  ones = np.ones((size, size), np.float32)

  def defect(kind, rng):
    if kind == 'hole':
      cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2).tolist()
      a = _blob_alpha(rng, size, cx, cy, rng.uniform(10, 24) * k, rough=0.35, edge=1.2)
      a = np.clip(a * (1.15 + 0.25 * nw), 0, 1)  # frayed rim
      out = _lerp(clean.copy(), [0.05, 0.05, 0.06], a)
      return out * _shade_from_alpha(a, strength=0.5)[..., None]
    if kind == 'stain':
      return _stain(rng, size, clean, ones, rng.uniform(16, 36) * k)
    ci, cj = _pick_thread(rng, size, u, v)
    if kind == 'pulled_thread':
      n = rng.integers(6, 16)
      taut = (i == ci) & (j >= cj) & (j < cj + n)
      return draw(taut=taut)
    if kind == 'misweave':
      ni, nj = rng.integers(3, 8, 2)
      rev = (i >= ci) & (i < ci + ni) & (j >= cj) & (j < cj + nj)
      return draw(reverse=rev)
    raise ValueError(kind)

  return clean, defect


def _pick_thread(rng, size, u, v):
  y, x = rng.integers(int(0.15 * size), int(0.75 * size), 2)
  return int(np.floor(u[y, x])), int(np.floor(v[y, x]))


def _make_marble(rng, size):
  k = size / 256
  base = _rgb(np.array([0.83, 0.81, 0.77]) * rng.uniform(0.96, 1.03) + rng.normal(0, 0.01, 3))
  vein_col = _rgb(np.array([0.33, 0.34, 0.38]) + rng.normal(0, 0.02, 3))
  turb = _noise(rng, size, size / 2.5) + 0.35 * _noise(rng, size, size / 7)
  turb2 = _noise(rng, size, size / 3) + 0.3 * _noise(rng, size, size / 9)
  strength = _sigmoid(2.0 * _noise(rng, size, size / 2.5))
  th = rng.uniform(0, np.pi)
  f = rng.uniform(0.8, 1.4)
  yy, xx = _grid(size)
  s = (xx * math.cos(th) + yy * math.sin(th)) / size
  s2 = (-xx * math.sin(th + 0.5) + yy * math.cos(th + 0.5)) / size
  d1 = np.abs(np.sin(np.pi * f * s + 1.3 * turb))
  d2 = np.abs(np.sin(np.pi * 1.9 * f * s2 + 1.6 * turb2))
  soft = np.exp(-((d1 / 0.28) ** 2))
  sharp = np.exp(-((d1 / 0.03) ** 2))
  faint = np.exp(-((d2 / 0.04) ** 2))
  w = np.clip(strength * (0.35 * soft + 0.55 * sharp) + 0.15 * faint, 0, 1)
  cloud = 0.05 * _noise(rng, size, size / 5) + 0.02 * _noise(rng, size, size / 15)
  grain = 0.025 * _grain(rng, size, 0.7 * k)
  specks = np.clip(_grain(rng, size, 0.9 * k) - 2.2, 0, None)  # mineral grains
  img = base * (1 + cloud + grain - 0.35 * specks)[..., None]
  clean = _lerp(img, vein_col, w).astype(np.float32)
  ones = np.ones((size, size), np.float32)

  def defect(kind, rng):
    if kind in ('crack', 'scratch'):
      crack = kind == 'crack'
      pts = _curve(rng, size, rng.uniform(80, 200) * k, bend=1.2, jag=0.25 if crack else 0.02)
      width = rng.uniform(3.0, 5.0) * k if crack else rng.uniform(2.5, 4.0) * k
      a = _polyline_alpha(size, pts, max(width, 1.0))
      if crack:
        return clean * (1 - a * rng.uniform(0.45, 0.7))[..., None]
      return _lerp(clean.copy(), [0.97, 0.97, 0.97], a * rng.uniform(0.3, 0.8))
    if kind == 'chip':
      cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2).tolist()
      a = _blob_alpha(rng, size, cx, cy, rng.uniform(10, 24) * k, rough=0.4, edge=1.0)
      pit = clean * rng.uniform(0.55, 0.8) * (1 + 0.08 * _grain(rng, size, 0.6)[..., None])
      out = clean * (1 - a[..., None]) + pit * a[..., None]
      return out * _shade_from_alpha(a, strength=0.6)[..., None]
    if kind == 'stain':
      return _stain(rng, size, clean, ones, rng.uniform(16, 36) * k)
    raise ValueError(kind)

  return clean, defect


def _pose(rng, size, shift=0.07):
  cx, cy = (size / 2 - 0.5 + rng.uniform(-shift, shift, 2) * size).tolist()
  return cx, cy, rng.uniform(-np.pi, np.pi), rng.uniform(0.97, 1.03)


def _to_local(size, cx, cy, ang, scale):
  yy, xx = _grid(size)
  dx, dy = xx - cx, yy - cy
  c, s = math.cos(ang), math.sin(ang)
  return (dx * c + dy * s) / scale, (-dx * s + dy * c) / scale


def _to_image(cx, cy, ang, scale, u, v):
  c, s = math.cos(ang), math.sin(ang)
  return cx + scale * (u * c - v * s), cy + scale * (u * s + v * c)


def _background(rng, size, color, amount=0.06):
  k = size / 256
  low = 1 + amount * _noise(rng, size, size / 3)
  fine = 0.025 * _grain(rng, size, 0.8 * k)
  return (np.asarray(color, np.float32) * (low + fine)[..., None]).astype(np.float32)


def _make_screw_plate(rng, size):
  L = float(size)
  cx, cy, ang, sc = _pose(rng, size)
  u, v = _to_local(size, cx, cy, ang, sc)
  bg = _background(rng, size, [0.20, 0.21, 0.23])
  brushed_1d = ndimage.gaussian_filter1d(rng.standard_normal(4 * size), 0.8)
  brushed = 1 + 0.05 * _rgb(np.interp(v, np.arange(4 * size) - 2 * size, brushed_1d))
  brushed = brushed * (1 + 0.04 * _noise(rng, size, size / 4))
  plate_col = _rgb(np.array([0.66, 0.67, 0.70]) * rng.uniform(0.95, 1.05))
  screw_xy = [(sx * 0.22 * L, sy * 0.13 * L) for sy in (-1, 1) for sx in (-1, 1)]
  slot_ang = rng.uniform(0, np.pi / 2, 4).tolist()
  light = (
    math.cos(-ang) * -0.7 - math.sin(-ang) * -0.7,
    math.sin(-ang) * -0.7 + math.cos(-ang) * -0.7,
  )  # in local frame
  r_head, r_sink, r_hole = 0.045 * L, 0.052 * L, 0.026 * L
  plate_sd = _sd_box(u, v, 0.31 * L, 0.22 * L, 0.04 * L)
  shadow_sd = _sd_box(*_to_local(size, cx + 0.012 * L, cy + 0.016 * L, ang, sc), 0.31 * L, 0.22 * L, 0.04 * L)
  shadow = ndimage.gaussian_filter(_cov(shadow_sd), 0.012 * L)
  boss_r = np.hypot(u, v)

  def draw_base():
    img = bg * (1 - 0.55 * shadow)[..., None]
    plate = plate_col * brushed[..., None]
    bevel = _cov(-plate_sd - 0.01 * L, 0.004 * L)  # 0 on the rim, 1 inside
    plate = plate * (0.78 + 0.22 * bevel)[..., None]
    # central machined boss with a through hole
    rings = 1 + 0.05 * np.cos(boss_r * (2 * np.pi / (0.012 * L)))
    boss = _cov(boss_r - 0.075 * L)
    plate = plate * (1 + boss * (rings - 1.0 + 0.06))[..., None]
    plate = _lerp(plate, [0.35, 0.35, 0.37], _cov(np.abs(boss_r - 0.075 * L) - 0.002 * L))
    img = img * (1 - _cov(plate_sd))[..., None] + plate * _cov(plate_sd)[..., None]
    through = _cov(boss_r - 0.03 * L)
    img = img * (1 - through)[..., None] + bg * through[..., None] * 0.6
    for sx, sy in screw_xy:
      sl, uu, vv = screw_window(sx, sy)
      d = np.hypot(uu, vv)
      _lerp(img[sl], [0.42, 0.43, 0.45], _cov(d - r_sink))  # countersink
      _lerp(img[sl], [0.07, 0.07, 0.08], _cov(d - r_hole))  # threaded hole
    return img.astype(np.float32)

  def screw_window(sx, sy):
    ix, iy = _to_image(cx, cy, ang, sc, sx, sy)
    sl = _window(size, ix, iy, (r_sink + 0.03 * L) * sc)
    return sl, u[sl] - sx, v[sl] - sy

  base = draw_base()

  def draw(present=(True,) * 4, offsets=None):
    img = base.copy()
    for n, (sx, sy) in enumerate(screw_xy):
      sl, uu, vv = screw_window(sx, sy)
      w = img[sl]
      if not present[n]:
        continue
      ox, oy = (0.0, 0.0) if offsets is None else offsets[n]
      hu, hv = uu - ox, vv - oy
      dh = np.hypot(hu, hv)
      z = np.sqrt(np.clip(1 - (dh / r_head) ** 2, 0, 1))
      spec = np.exp(
        -((hu - light[0] * 0.4 * r_head) ** 2 + (hv - light[1] * 0.4 * r_head) ** 2) / (0.3 * r_head) ** 2
      )
      head = _rgb([0.56, 0.58, 0.62]) * (0.55 + 0.45 * z)[..., None] + 0.35 * spec[..., None]
      ca, sa = math.cos(slot_ang[n]), math.sin(slot_ang[n])
      a, b = hu * ca + hv * sa, -hu * sa + hv * ca
      slot = np.minimum(_sd_box(a, b, 0.032 * L, 0.007 * L), _sd_box(a, b, 0.007 * L, 0.032 * L))
      _lerp(head, [0.12, 0.12, 0.13], _cov(slot))
      ch = _cov(dh - r_head)[..., None]
      w[:] = w * (1 - ch) + head * ch
    return np.clip(img, 0, 1).astype(np.float32)

  clean = draw()
  on_plate = _cov(plate_sd + 0.02 * L)

  def defect(kind, rng):
    n = rng.integers(4)
    if kind == 'missing_screw':
      return draw(present=tuple(i != n for i in range(4)))
    if kind == 'misplaced_screw':
      offs = [(0.0, 0.0)] * 4
      t = rng.uniform(0, 2 * np.pi)
      d = rng.uniform(0.03, 0.05) * L
      offs[n] = (d * math.cos(t), d * math.sin(t))
      return draw(offsets=offs)
    if kind == 'scratch':
      x, y = _pick_point(rng, on_plate)
      pts = _curve(rng, size, rng.uniform(70, 170) * L / 256, start=np.array([x, y]), bend=1.0, jag=0.03)
      a = _polyline_alpha(size, pts, max(rng.uniform(2.2, 3.5) * L / 256, 1.0)) * on_plate
      col = [0.92] * 3 if rng.random() < 0.5 else [0.25] * 3
      return _lerp(clean.copy(), col, a * rng.uniform(0.5, 0.9))
    if kind == 'stain':
      return _stain(rng, size, clean, on_plate, rng.uniform(14, 32) * L / 256)
    raise ValueError(kind)

  return clean, defect


def _make_connector(rng, size):
  L = float(size)
  cx, cy, ang, sc = _pose(rng, size, shift=0.06)
  u, v = _to_local(size, cx, cy, ang, sc)
  bg = _background(rng, size, [0.60, 0.60, 0.57], amount=0.05)
  tex = 1 + 0.05 * _grain(rng, size, 1.2 * L / 256)
  pin_x = [(n - 2.5) * 0.1 * L for n in range(6)]
  pin_jit = rng.normal(0, 0.0015 * L, (6, 2)).tolist()  # pins are not perfectly placed
  gold = _rgb(np.array([0.90, 0.72, 0.33]) * rng.uniform(0.95, 1.05))
  flange_sd = _sd_box(u, v, 0.44 * L, 0.07 * L, 0.03 * L)
  body_sd = np.minimum(
    _sd_box(u, v, 0.33 * L, 0.13 * L, 0.02 * L), _sd_box(u, v + 0.15 * L, 0.07 * L, 0.03 * L, 0.008 * L)
  )
  ear_sd = np.minimum(np.hypot(u - 0.39 * L, v), np.hypot(u + 0.39 * L, v))
  sil = np.maximum(_cov(flange_sd), _cov(body_sd))
  su, sv = _to_local(size, cx + 0.015 * L, cy + 0.02 * L, ang, sc)
  shadow_sil = np.maximum(
    _cov(_sd_box(su, sv, 0.44 * L, 0.07 * L, 0.03 * L)), _cov(_sd_box(su, sv, 0.33 * L, 0.13 * L, 0.02 * L))
  )
  shadow = ndimage.gaussian_filter(shadow_sil, 0.015 * L)
  hp, hc = 0.022 * L, 0.037 * L  # pin / cavity half size

  def draw_base():
    img = bg * (1 - 0.45 * shadow)[..., None]
    _lerp(img, _rgb([0.27, 0.27, 0.28]) * tex[..., None], _cov(flange_sd))
    _lerp(img, [0.72, 0.70, 0.62], _cov(ear_sd - 0.03 * L))  # brass eyelets
    hole = _cov(ear_sd - 0.018 * L)[..., None]
    img = img * (1 - hole) + bg * hole * 0.7
    body = _rgb([0.15, 0.15, 0.16]) * tex[..., None]
    rim = _cov(np.abs(body_sd + 0.004 * L) - 0.003 * L)
    _lerp(img, body, _cov(body_sd))
    _lerp(img, [0.26, 0.26, 0.27], rim)
    _lerp(img, [0.85, 0.85, 0.82], _cov(np.hypot(u + 0.30 * L, v - 0.095 * L) - 0.012 * L))
    for px in pin_x:
      sl, uu, vv = pin_window(px)
      _lerp(img[sl], [0.06, 0.06, 0.065], _cov(_sd_box(uu, vv, hc, hc, 0.005 * L)))
    return img.astype(np.float32)

  def pin_window(px):
    ix, iy = _to_image(cx, cy, ang, sc, px, 0.0)
    sl = _window(size, ix, iy, 0.09 * L * sc)
    return sl, u[sl] - px, v[sl]

  base = draw_base()

  def draw(present=(True,) * 6, bend=None):
    img = base.copy()
    for n, px in enumerate(pin_x):
      sl, uu, vv = pin_window(px)
      w = img[sl]
      if not present[n]:
        continue
      pu, pv = uu - pin_jit[n][0], vv - pin_jit[n][1]
      if bend is not None and bend[0] == n:
        bx, by = bend[1], bend[2]
        stem = _sd_segment(pu, pv, 0, 0, bx, by, 0.012 * L)
        _lerp(w, gold * 0.7, _cov(stem))
        pu, pv = pu - bx, pv - by
      sh = _sd_box(pu - 0.006 * L, pv - 0.008 * L, hp, hp, 0.006 * L)
      _lerp(w, [0.02, 0.02, 0.02], 0.6 * _cov(sh, 0.006 * L))  # shadow
      top = 1 - np.maximum(np.abs(pu), np.abs(pv)) / hp
      col = gold * (0.7 + 0.45 * np.clip(top, 0, 1))[..., None]
      _lerp(w, col, _cov(_sd_box(pu, pv, hp, hp, 0.006 * L)))
    return np.clip(img, 0, 1).astype(np.float32)

  clean = draw()
  cavities = np.zeros((size, size), np.float32)
  for px in pin_x:
    np.maximum(cavities, _cov(_sd_box(u - px, v, hc + 0.004 * L, hc + 0.004 * L)), out=cavities)
  housing = _cov(body_sd + 0.006 * L) * (1 - cavities)

  def defect(kind, rng):
    n = rng.integers(6)
    if kind == 'missing_pin':
      return draw(present=tuple(i != n for i in range(6)))
    if kind == 'bent_pin':
      t = rng.uniform(0, 2 * np.pi)
      d = rng.uniform(0.035, 0.06) * L
      return draw(bend=(n, d * math.cos(t), d * math.sin(t)))
    if kind == 'contamination':
      if rng.random() < 0.5:  # a particle on the housing or a pin
        x, y = _pick_point(rng, np.maximum(housing, cavities))
        a = _blob_alpha(rng, size, x, y, rng.uniform(9, 18) * L / 256, rough=0.4, edge=1.0)
      else:  # a fibre lying across the part
        x, y = _pick_point(rng, sil)
        pts = _curve(rng, size, rng.uniform(70, 150) * L / 256, start=np.array([x, y]), bend=2.0, jag=0.1)
        a = _polyline_alpha(size, pts, max(rng.uniform(2.5, 4.0) * L / 256, 1.0), taper=False)
      col = [0.86, 0.85, 0.80] if rng.random() < 0.5 else [0.55, 0.38, 0.20]
      return _lerp(clean.copy(), col, a * rng.uniform(0.6, 0.95))
    if kind == 'crack':
      x, y = _pick_point(rng, housing, margin=4)
      pts = _curve(rng, size, rng.uniform(80, 160) * L / 256, start=np.array([x, y]), bend=1.0, jag=0.3)
      a = _polyline_alpha(size, pts, max(rng.uniform(3.0, 4.5) * L / 256, 1.0)) * housing
      return _lerp(clean.copy(), [0.42, 0.42, 0.43], a * rng.uniform(0.5, 0.9))
    raise ValueError(kind)

  return clean, defect


def _make_ring_seal(rng, size):
  k = size / 256
  yy, xx = _grid(size)
  cx, cy = (size / 2 - 0.5 + np.clip(rng.normal(0, 2.0 * k, 2), -5 * k, 5 * k)).tolist()
  r_cap = 0.40 * size * rng.uniform(0.985, 1.015)
  r_ring = 0.70 * r_cap * rng.uniform(0.99, 1.01)
  hw = 0.065 * r_cap  # ring half width
  gain = rng.uniform(0.94, 1.06)
  t_amb, t_cap, t_foil, t_ring = 0.10, 0.25, 0.40, 0.80
  harm = [(kk, rng.normal(0, 0.03), rng.uniform(0, 2 * np.pi)) for kk in (1, 2, 3, 4)]
  cap = _sigmoid((r_cap - np.hypot(xx - cx, yy - cy)) / (1.2 * k))
  cap_grad = 1 + 0.06 * _noise(rng, size, size / 3)
  drift = 0.02 * _noise(rng, size, size / 2)

  def draw(shift=None, gap=None, foil_hole=None, spot=None):
    dx, dy = xx - cx, yy - cy
    rr = np.hypot(dx, dy)
    th = np.arctan2(dy, dx)
    if shift is not None:  # the seal sits off its circle along one arc
      t0, half, d = shift
      dth = np.abs(np.angle(np.exp(1j * (th - t0))))
      rr = rr - d * 0.5 * (1 + np.cos(np.pi * np.minimum(dth / half, 1)))
    e = np.abs(rr - r_ring) - hw
    core = _sigmoid(-e / (1.2 * k))
    halo = np.exp(-np.maximum(e, 0) / (0.2 * r_cap))  # thermal conduction
    ring = np.maximum(core, 0.08 * halo)
    ring = ring * (1 + sum(a * np.cos(kk * th + p) for kk, a, p in harm))
    if gap is not None:  # broken / nicked ring: a cold angular gap
      t0, half, depth = gap
      dth = np.abs(np.angle(np.exp(1j * (th - t0))))
      ring = ring * (1 - depth * _sigmoid((half - dth) * r_ring / (1.5 * k)))
    foil = _sigmoid((r_ring - hw - rr) / (1.5 * k)) * (0.85 + 0.15 * (rr / r_ring) ** 2)
    if foil_hole is not None:
      foil = foil * (1 - foil_hole)
    t = t_cap * cap_grad + (t_foil - t_cap) * foil + (t_ring - t_cap) * ring
    if spot is not None:
      sx, sy, sig, amp = spot
      t = t + amp * np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * sig * sig))
    img = t_amb + drift + cap * (t - t_amb)
    img = ndimage.gaussian_filter(img.astype(np.float32), 1.2 * k)
    return np.clip(img * gain, 0, 1).astype(np.float32)

  clean = draw()

  def defect(kind, rng):
    if kind == 'broken_ring':
      arc = rng.uniform(12, 45) * k
      depth = rng.uniform(0.45, 1.0)
      return draw(gap=(rng.uniform(-np.pi, np.pi), arc / 2 / r_ring, depth))
    if kind == 'missing_foil':
      rad = rng.uniform(9, 20) * k
      t = rng.uniform(0, 2 * np.pi)
      d = rng.uniform(0, max(r_ring - hw - rad * 1.2, 1))
      a = _blob_alpha(rng, size, cx + d * math.cos(t), cy + d * math.sin(t), rad, rough=0.3, edge=1.5 * k)
      return draw(foil_hole=a * rng.uniform(0.6, 1.0))
    if kind == 'off_centre':  # crooked cap: the seal ring is eccentric on one side
      half = rng.uniform(0.35, 0.9)
      d = rng.uniform(5.0, 10.0) * k * (1 if rng.random() < 0.5 else -1)
      return draw(shift=(rng.uniform(-np.pi, np.pi), half, d))
    if kind == 'thermal_spot':
      t = rng.uniform(0, 2 * np.pi)
      d = np.sqrt(rng.uniform(0, 1)) * (r_cap - 10 * k)
      amp = rng.uniform(0.12, 0.3) * (1 if rng.random() < 0.5 else -1)
      return draw(spot=(cx + d * math.cos(t), cy + d * math.sin(t), rng.uniform(4, 9) * k, amp))
    raise ValueError(kind)

  return clean, defect


_MAKERS = {
  'weave': _make_weave,
  'marble': _make_marble,
  'screw_plate': _make_screw_plate,
  'connector': _make_connector,
  'ring_seal': _make_ring_seal,
}


# ----------------------------------------------------------------------------
# Public API.


def _quantize(img):
  return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _parse_split(category, split):
  if category not in _MAKERS:
    raise ValueError(f'unknown synthetic category {category!r}; known: {CATEGORIES}')
  if split in ('train', 'test/good'):
    return 'good'
  kind = split[5:] if split.startswith('test/') else None
  if kind not in DEFECT_TYPES[category]:
    raise ValueError(
      f'split must be "train", "test/good" or one of '
      f'{["test/" + t for t in DEFECT_TYPES[category]]}, got {split!r}'
    )
  return kind


def render(category: str, split: str, index: int, *, seed: int, image_size: int, clean: bool = False):
  """Render one image: (image uint8, mask uint8 {0,255} or None, defect_type).

  `split` is 'train', 'test/good' or 'test/<defect type>'. Images are HxWx3,
  or HxW for ring_seal. With `clean=True` the defect-free version of the same
  image is returned (with the same mask), so that
  ``mask == 255 * (render(...) != render(..., clean=True))`` pixel-wise.
  """
  kind = _parse_split(category, split)
  size = int(image_size)
  rng = _rng(seed, category, split, index)
  clean_f, make_defect = _MAKERS[category](rng, size)
  noise_sigma = 0.015 if category in GRAYSCALE else 0.012
  noise = rng.normal(0, noise_sigma, clean_f.shape).astype(np.float32)
  if category in GRAYSCALE:  # fixed-pattern column noise of the IR sensor
    noise += rng.normal(0, 0.006, (1, size)).astype(np.float32)
  clean_q = _quantize(clean_f + noise)
  if kind == 'good':
    return clean_q, None, 'good'
  # Draw the defect; redraw (same stream, so still deterministic) until its
  # exact mask has an area within AREA_RANGE, else keep the closest attempt.
  lo, hi = AREA_RANGE[0] * size * size, AREA_RANGE[1] * size * size
  best, best_miss = None, np.inf
  for _ in range(_MAX_TRIES):
    bad_f = make_defect(kind, rng)
    bad_q = _quantize(bad_f + noise)
    diff = np.abs(bad_f - clean_f)
    changed = bad_q != clean_q
    if diff.ndim == 3:
      diff, changed = diff.max(-1), changed.any(-1)
    mask = (diff > _THRESHOLD) & changed
    area = int(mask.sum())
    miss = max(np.log(lo / area), np.log(area / hi), 0.0) if area else np.inf
    if miss < best_miss:
      best, best_miss = (mask, bad_q), miss
    if miss == 0.0:
      break
  if best is None:
    raise RuntimeError(f'could not draw a visible {kind} on {category} #{index}')
  mask, bad_q = best
  m = mask if bad_q.ndim == 2 else mask[..., None]
  image = clean_q if clean else np.where(m, bad_q, clean_q)
  return image, mask.astype(np.uint8) * 255, kind


def _counts(category, num_test_defect):
  types = DEFECT_TYPES[category]
  base, extra = divmod(int(num_test_defect), len(types))
  return {t: base + (i < extra) for i, t in enumerate(types)}


def _save_png(path, array):
  Image.fromarray(array).save(path, format='PNG', compress_level=1)


def _jobs(categories, num_train, num_test_good, num_test_defect):
  jobs = []
  for cat in categories:
    jobs += [(cat, 'train', i) for i in range(num_train)]
    jobs += [(cat, 'test/good', i) for i in range(num_test_good)]
    for t, n in _counts(cat, num_test_defect).items():
      jobs += [(cat, 'test/' + t, i) for i in range(n)]
  return jobs


def _write_job(root, job, seed, image_size):
  cat, split, i = job
  image, mask, kind = render(cat, split, i, seed=seed, image_size=image_size)
  folder = os.path.join(root, cat, split if split != 'train' else 'train/good')
  stem = f'{i:03d}'
  _save_png(os.path.join(folder, stem + '.png'), image)
  if mask is not None:
    _save_png(os.path.join(root, cat, 'ground_truth', kind, stem + '_mask.png'), mask)


def generate(
  root,
  *,
  seed=0,
  image_size=256,
  num_train=60,
  num_test_good=15,
  num_test_defect=30,
  categories=CATEGORIES,
  progress=True,
) -> str:
  """Write the dataset in MVTec layout under `root`; returns `root`."""
  root = os.fspath(root)
  categories = tuple(categories)
  for cat in categories:
    _parse_split(cat, 'train')
  jobs = _jobs(categories, num_train, num_test_good, num_test_defect)
  for cat in categories:
    os.makedirs(os.path.join(root, cat, 'train', 'good'), exist_ok=True)
    os.makedirs(os.path.join(root, cat, 'test', 'good'), exist_ok=True)
    for t, n in _counts(cat, num_test_defect).items():
      if n:
        os.makedirs(os.path.join(root, cat, 'test', t), exist_ok=True)
        os.makedirs(os.path.join(root, cat, 'ground_truth', t), exist_ok=True)
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  for job in tqdm(jobs, desc='jaxad synthetic dataset', unit='img', disable=not progress):
    _write_job(root, job, seed, image_size)
  meta = {
    'name': 'jaxad-synthetic',
    'version': VERSION,
    'seed': seed,
    'image_size': image_size,
    'num_train': num_train,
    'num_test_good': num_test_good,
    'num_test_defect': num_test_defect,
    'categories': {
      c: {'defect_types': _counts(c, num_test_defect), 'channels': 1 if c in GRAYSCALE else 3}
      for c in categories
    },
    'area_range': AREA_RANGE,
  }
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  with open(os.path.join(root, 'README.txt'), 'w') as f:
    f.write(
      f'jaxad synthetic anomaly-detection dataset, generator version {VERSION}\n'
      f'seed={seed} image_size={image_size} train/good={num_train} '
      f'test/good={num_test_good} test defects={num_test_defect} per category\n'
      'Layout: MVTec AD (<category>/train/good, <category>/test/<type>, '
      '<category>/ground_truth/<type>/<stem>_mask.png).\n'
      'Masks are exact: the pixels where the image differs from its '
      'defect-free rendering.\n'
      'Categories and defect counts:\n'
      + ''.join(
        f'  {c}: {", ".join(f"{t} {n}" for t, n in _counts(c, num_test_defect).items())}\n'
        for c in categories
      )
    )
  return root


def _cache_name(seed, image_size, num_train, num_test_good, num_test_defect, categories):
  args = json.dumps(
    [VERSION, int(seed), image_size, num_train, num_test_good, num_test_defect, list(categories)]
  )
  return f'synthetic-v{VERSION}-{hashlib.sha256(args.encode()).hexdigest()[:12]}'


def ensure(
  cache_dir=None,
  *,
  seed=0,
  image_size=256,
  num_train=60,
  num_test_good=15,
  num_test_defect=30,
  categories=CATEGORIES,
  progress=True,
) -> str:
  """Generate the dataset once into the cache and return its root.

  The root is ``<cache_dir or $JAXAD_CACHE or ~/.cache/jaxad>/synthetic-v<V>-<hash>``.
  Generation happens in a temporary sibling folder that is renamed into place,
  so concurrent callers never see a partial dataset.
  """
  categories = tuple(categories)
  base = os.fspath(cache_dir or jaxad.cache_root())
  root = os.path.join(
    base, _cache_name(seed, image_size, num_train, num_test_good, num_test_defect, categories)
  )
  if os.path.exists(os.path.join(root, '.complete')):
    return root
  os.makedirs(base, exist_ok=True)
  tmp = f'{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    generate(
      tmp,
      seed=seed,
      image_size=image_size,
      num_train=num_train,
      num_test_good=num_test_good,
      num_test_defect=num_test_defect,
      categories=categories,
      progress=progress,
    )
    with open(os.path.join(tmp, '.complete'), 'w') as f:
      f.write('ok\n')
    if os.path.isdir(root) and not os.path.exists(os.path.join(root, '.complete')):
      shutil.rmtree(root, ignore_errors=True)  # leftover without a marker
    try:
      os.replace(tmp, root)
    except OSError:
      if not os.path.exists(os.path.join(root, '.complete')):
        raise  # not a lost race: a real error
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root
