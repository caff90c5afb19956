"""MVTec-AD-layout image folders (also BTAD-like and custom datasets).

Layout::

    <root>/<category>/train/<good_name>/<image>
    <root>/<category>/test/<type>/<image>            # type == good_name: normal
    <root>/<category>/ground_truth/<type>/<stem><mask_suffix>.<ext>

Everything here is pure and picklable so it can run inside grain workers.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
SPLITS = ('train', 'test')


class DatasetError(ValueError):
  """A dataset folder or file is missing, empty or unreadable."""


@dataclasses.dataclass(frozen=True)
class Sample:
  image_path: str
  category: str
  defect_type: str  # 'good' for normal images
  label: int  # 0 normal, 1 anomalous
  mask_path: str | None  # None for normal images


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: str) -> list[str]:
  """Sorted image file names in `folder` (DatasetError if it is missing)."""
  if not os.path.isdir(folder):
    raise DatasetError(f'{folder}: folder does not exist')
  return sorted(n for n in os.listdir(folder) if _is_image(n) and os.path.isfile(os.path.join(folder, n)))


def list_categories(root: str) -> list[str]:
  """Sorted sub-folders of `root` that contain a `train/` folder."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DatasetError(f'{root}: dataset root does not exist')
  cats = sorted(
    n for n in os.listdir(root) if not n.startswith('.') and os.path.isdir(os.path.join(root, n, 'train'))
  )
  if not cats:
    raise DatasetError(f'{root}: no category folders found (expected <root>/<category>/train/)')
  return cats


def resolve_categories(root: str, categories, available: list[str] | None = None) -> list[str]:
  """'all' -> every category; 'a,b' or a list/tuple of names -> checked list.

  `available`: the categories to choose from (default: those found under `root`).
  """
  available = available if available is not None else list_categories(root)
  if isinstance(categories, str):
    if categories == 'all':
      return available
    categories = [c.strip() for c in categories.split(',') if c.strip()]
  categories = list(categories)
  if not categories:
    raise DatasetError(f'{root}: empty category list')
  unknown = [c for c in categories if c not in available]
  if unknown:
    raise DatasetError(
      f'{os.fspath(root)}: unknown categor{"y" if len(unknown) == 1 else "ies"} '
      f'{", ".join(map(repr, unknown))}; available: {", ".join(available)}'
    )
  return categories


def _find_mask(gt_dir: str, gt_names: dict[str, str], stem: str, mask_suffix: str) -> str | None:
  """Mask path for `stem` with any supported extension (or None)."""
  for ext in IMAGE_EXTENSIONS:  # deterministic preference: .png first
    name = gt_names.get((stem + mask_suffix + ext).lower())
    if name is not None:
      return os.path.join(gt_dir, name)
  return None


def scan_split(
  root: str, category: str, split: str, *, good_name: str = 'good', mask_suffix: str = '_mask'
) -> list[Sample]:
  """All samples of one split, sorted by defect type then file name."""
  if split not in SPLITS:
    raise DatasetError(f'split must be one of {SPLITS}, got {split!r}')
  cat_dir = os.path.join(os.fspath(root), category)
  if not os.path.isdir(cat_dir):
    raise DatasetError(f'{cat_dir}: category folder does not exist')
  split_dir = os.path.join(cat_dir, split)
  if split == 'train':
    type_dirs = [good_name]
  else:
    if not os.path.isdir(split_dir):
      raise DatasetError(f'{split_dir}: folder does not exist')
    type_dirs = sorted(
      n for n in os.listdir(split_dir) if not n.startswith('.') and os.path.isdir(os.path.join(split_dir, n))
    )
  samples = []
  for tdir in type_dirs:
    folder = os.path.join(split_dir, tdir)
    names = _list_images(folder)
    if tdir == good_name:
      samples += [Sample(os.path.join(folder, n), category, 'good', 0, None) for n in names]
      continue
    gt_dir = os.path.join(cat_dir, 'ground_truth', tdir)
    gt_names = {}
    if os.path.isdir(gt_dir):
      gt_names = {n.lower(): n for n in os.listdir(gt_dir) if _is_image(n)}
    for n in names:
      stem = os.path.splitext(n)[0]
      mask = _find_mask(gt_dir, gt_names, stem, mask_suffix)
      if mask is None:
        expected = os.path.join(gt_dir, stem + mask_suffix + '.png')
        raise DatasetError(
          f'{os.path.join(folder, n)}: defect image has no mask; expected '
          f'{expected} (or another of {", ".join(IMAGE_EXTENSIONS)})'
        )
      samples.append(Sample(os.path.join(folder, n), category, tdir, 1, mask))
  if not samples:
    raise DatasetError(
      f'{split_dir}: no images found in {category}/{split} (extensions {", ".join(IMAGE_EXTENSIONS)})'
    )
  samples.sort(key=lambda s: (s.defect_type, os.path.basename(s.image_path)))
  return samples


def _hw(image_size) -> tuple[int, int]:
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  h, w = image_size
  return int(h), int(w)


def _resize(im: Image.Image, hw: tuple[int, int], resample) -> Image.Image:
  size = (hw[1], hw[0])  # PIL wants (W, H)
  return im if im.size == size else im.resize(size, resample)


def _decode(path: str, what: str, convert):
  """Open, fully decode (catches truncation) and convert; DatasetError on failure."""
  try:
    with Image.open(path) as im:
      im.load()
      return convert(im)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise DatasetError(f'{path}: cannot read {what} ({type(e).__name__}: {e})') from e


_HIGH_BIT_SCALE = {
  'I;16': 65535.0,
  'I;16L': 65535.0,
  'I;16B': 65535.0,
  'I;16N': 65535.0,
  'I': 65535.0,
  'F': 1.0,
}


def _image_to_array(im: Image.Image, hw, channels: int) -> np.ndarray:
  if im.mode in _HIGH_BIT_SCALE:  # 16/32-bit gray: resize in float
    a = np.asarray(im).astype(np.float32) / _HIGH_BIT_SCALE[im.mode]
    im = Image.fromarray(np.clip(a, 0.0, 1.0))  # mode 'F'
    out = np.asarray(_resize(im, hw, Image.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)[..., None]
  if im.mode in ('LA', 'La'):
    im = im.getchannel(0)
  elif im.mode == '1':
    im = im.convert('L')
  elif im.mode != 'L':
    im = im.convert('RGB')  # RGBA/RGBa/RGBX (alpha dropped), P, CMYK, ...
    if channels == 1:
      im = im.convert('L')  # ITU-R 601-2 luma, as PIL does
  out = np.asarray(_resize(im, hw, Image.BILINEAR), dtype=np.float32)
  return (out * (1.0 / 255.0)).reshape(hw[0], hw[1], -1)


def load_image(path: str, image_size, channels: int = 3) -> np.ndarray:
  """float32 HxWxC image in [0, 1], bilinear (antialiased) resize.

  `image_size` is an int (square) or (height, width). Gray is replicated for
  channels=3; colour becomes luminance (PIL 'L' formula) for channels=1.
  16-bit gray is scaled by 1/65535.
  """
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')
  hw = _hw(image_size)
  out = _decode(path, 'image', lambda im: _image_to_array(im, hw, channels))
  if out.shape[-1] != channels:
    out = np.repeat(out, channels, axis=-1)
  return np.ascontiguousarray(out, dtype=np.float32)


def _mask_to_array(im: Image.Image) -> np.ndarray:
  if im.mode in ('LA', 'La', 'PA'):
    im = im.convert('RGB') if im.mode == 'PA' else im.getchannel(0)
  elif im.mode not in ('1', 'L', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F', 'RGB'):
    im = im.convert('RGB')  # P, RGBA (alpha ignored), CMYK, ...
  a = np.asarray(im)
  return a.any(axis=-1) if a.ndim == 3 else a != 0


def load_mask(path: str, image_size) -> np.ndarray:
  """uint8 HxW mask in {0, 1} (any nonzero pixel -> 1), nearest resize."""
  hw = _hw(image_size)
  a = _decode(path, 'mask', _mask_to_array)
  m = Image.fromarray(a.astype(np.uint8))
  return np.array(_resize(m, hw, Image.NEAREST), dtype=np.uint8)
