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
import struct
import zlib

import numpy as np
from absl import logging
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
SPLITS = ('train', 'test')
_ORIENTATION = 0x0112  # EXIF tag
_SWAPS_AXES = (5, 6, 7, 8)  # orientations that transpose width and height
_PNG_METADATA = (b'eXIf', b'tEXt', b'zTXt', b'iTXt')


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


def _unreadable(path: str) -> str | None:
  """Why the directory entry `path` cannot be read as a file (None if it can)."""
  if os.path.islink(path) and not os.path.exists(path):
    return f'dangling symbolic link (to {os.readlink(path)})'
  if not os.path.isfile(path):
    return 'not a regular file'
  if not os.access(path, os.R_OK):
    return 'not readable (permissions)'
  return None


def _list_images(folder: str) -> list[str]:
  """Sorted image file names in `folder` (DatasetError if it is missing or holds an unreadable one)."""
  if not os.path.isdir(folder):
    raise DatasetError(f'{folder}: folder does not exist')
  names = sorted(n for n in os.listdir(folder) if _is_image(n))
  for n in names:
    why = _unreadable(os.path.join(folder, n))
    if why:
      raise DatasetError(f'{os.path.join(folder, n)}: {why}')
  return names


def list_categories(root: str) -> list[str]:
  """Sorted sub-folders of `root` that contain a `train/` folder; logs a warning for those without."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DatasetError(f'{root}: dataset root does not exist')
  cats = []
  for n in sorted(os.listdir(root)):
    path = os.path.join(root, n)
    if n.startswith('.'):
      continue
    if os.path.isdir(os.path.join(path, 'train')):
      cats.append(n)
    elif os.path.isdir(path):
      logging.warning('%s: skipped, not a category (no train/ folder in it)', path)
    elif os.path.islink(path) and not os.path.exists(path):
      logging.warning('%s: skipped, dangling symbolic link (to %s)', path, os.readlink(path))
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
    type_dirs = []
    for n in sorted(os.listdir(split_dir)):
      path = os.path.join(split_dir, n)
      if n.startswith('.'):
        continue
      if os.path.islink(path) and not os.path.exists(path):
        raise DatasetError(f'{path}: dangling symbolic link (to {os.readlink(path)})')
      if os.path.isdir(path):
        type_dirs.append(n)
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
      why = _unreadable(mask)
      if why:
        raise DatasetError(f'{mask}: mask of {os.path.join(folder, n)}: {why}')
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
  """Open, fully decode (catches truncation), apply EXIF orientation and convert; DatasetError on failure."""
  try:
    with Image.open(path) as im:
      im.load()
      ImageOps.exif_transpose(im, in_place=True)
      return convert(im)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise DatasetError(f'{path}: cannot read {what} ({type(e).__name__}: {e})') from e


def _png_metadata_after_image(path: str) -> bool:
  """Checks the CRC of every PNG chunk up to IEND; True if metadata chunks follow the image data."""
  with open(path, 'rb') as f:
    data = f.read()
  pos, seen_idat, late = 8, False, False
  while True:
    if pos + 12 > len(data):
      raise OSError('truncated PNG file')
    length, kind = struct.unpack('>I4s', data[pos : pos + 8])
    end = pos + 12 + length
    if end > len(data):
      raise OSError(f'truncated PNG file (in a {kind!r} chunk)')
    if zlib.crc32(data[pos + 4 : end - 4]) != struct.unpack('>I', data[end - 4 : end])[0]:
      raise OSError(f'broken PNG file (CRC error in a {kind!r} chunk)')
    if kind == b'IEND':
      return late
    seen_idat |= kind == b'IDAT'
    late |= seen_idat and kind in _PNG_METADATA
    pos = end


def _probe(path: str, what: str, decode: bool = True) -> tuple[int, int]:
  """(width, height) after EXIF orientation; `decode` also checks the file's data (cheaply).

  JPEG is decoded at 1/8 scale, PNG is checked chunk by chunk (CRCs), other formats are decoded.
  DatasetError if the file cannot be read.
  """
  try:
    with Image.open(path) as im:
      w, h = im.size
      if im.format == 'PNG' and not _png_metadata_after_image(path):
        exif = Image.Image.getexif(im)  # PngImageFile.getexif would decode the pixels to find late chunks.
      else:
        if im.format in ('JPEG', 'MPO'):
          if decode:
            im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
            im.load()
        else:
          im.load()
        exif = im.getexif()
      return (h, w) if exif.get(_ORIENTATION, 1) in _SWAPS_AXES else (w, h)
  except Exception as e:
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
  """float32 HxWxC image in [0, 1], EXIF orientation applied, bilinear (antialiased) resize.

  `image_size` is an int (square) or (height, width). Gray is replicated for
  channels=3; colour becomes luminance (PIL 'L' formula) for channels=1.
  16-bit gray is scaled by 1/65535.
  """
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')
  out, _ = _decode(path, 'image', lambda im: (_image_to_array(im, _hw(image_size), channels), im.size))
  return _channels(out, channels)


def _channels(out: np.ndarray, channels: int) -> np.ndarray:
  if out.shape[-1] != channels:
    out = np.repeat(out, channels, axis=-1)
  return np.ascontiguousarray(out, dtype=np.float32)


def _mask_values(im: Image.Image) -> tuple[np.ndarray, float]:
  """The mask's pixel values (HxW or HxWxC) and the threshold at or above which a pixel is defect."""
  if im.mode == '1':
    return np.asarray(im), 1
  if im.mode in _HIGH_BIT_SCALE:
    return np.asarray(im), _HIGH_BIT_SCALE[im.mode] / 2
  if im.mode in ('LA', 'La'):
    im = im.getchannel(0)
  elif im.mode not in ('L', 'RGB'):
    im = im.convert('RGB')  # P, PA, RGBA (alpha ignored), CMYK, ...
  return np.asarray(im), 127.5


def _binarize(values: np.ndarray, threshold) -> np.ndarray:
  if np.issubdtype(values.dtype, np.integer) and values.max(initial=0) == 1:
    threshold = 1  # A 0/1 label mask.
  m = values >= threshold
  return m.any(axis=-1) if m.ndim == 3 else m


def _mask_to_array(im: Image.Image) -> np.ndarray:
  return _binarize(*_mask_values(im))


def _resize_mask(a: np.ndarray, image_size) -> np.ndarray:
  m = Image.fromarray(a.astype(np.uint8))
  return np.array(_resize(m, _hw(image_size), Image.NEAREST), dtype=np.uint8)


def _size_mismatch(image_path: str, image_wh, mask_path: str, mask_wh) -> DatasetError:
  return DatasetError(
    f'{mask_path}: mask is {mask_wh[0]}x{mask_wh[1]} (WxH) but its image {image_path} is '
    f"{image_wh[0]}x{image_wh[1]} (after EXIF orientation); masks must have their image's size"
  )


def load_mask(path: str, image_size, image_path: str | None = None) -> np.ndarray:
  """uint8 HxW mask in {0, 1}, EXIF orientation applied, nearest resize.

  A pixel is defect (1) when its value is at least half the format's maximum: >= 128 for 8-bit,
  >= 32768 for 16-bit (and 32-bit integer, as load_image scales it), >= 0.5 for float, any set bit
  for mode '1'; RGB and palette masks: any channel at or above 128 (alpha ignored). A mask whose
  largest value is 1 is a 0/1 label mask: its 1s are defect. So 0/255 and 0/1 masks are exact and
  JPEG noise is dropped.

  `image_path`: the mask's image; DatasetError naming both files if their sizes differ.
  """
  if image_path is None:
    return _resize_mask(_decode(path, 'mask', _mask_to_array), image_size)
  return _load_mask_of(image_path, _probe(image_path, 'image', decode=False), path, image_size)


def _load_mask_of(image_path: str, image_wh, mask_path: str, image_size) -> np.ndarray:
  a, mask_wh = _decode(mask_path, 'mask', lambda im: (_mask_to_array(im), im.size))
  if mask_wh != image_wh:
    raise _size_mismatch(image_path, image_wh, mask_path, mask_wh)
  return _resize_mask(a, image_size)


def load_pair(
  image_path: str, mask_path: str | None, image_size, channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
  """(load_image, load_mask) of an image and its mask (zeros if None); DatasetError if their sizes differ."""
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')
  hw = _hw(image_size)
  out, image_wh = _decode(image_path, 'image', lambda im: (_image_to_array(im, hw, channels), im.size))
  if mask_path is None:
    return _channels(out, channels), np.zeros(hw, np.uint8)
  return _channels(out, channels), _load_mask_of(image_path, image_wh, mask_path, image_size)


def _check_sample(s: Sample) -> tuple[list[str], list[str]]:
  errors, warnings = [], []
  try:
    image_wh = _probe(s.image_path, 'image')
  except DatasetError as e:
    errors.append(str(e))
    image_wh = None
  if s.mask_path is None:
    return errors, warnings
  try:
    values, threshold, mask_wh = _decode(s.mask_path, 'mask', lambda im: (*_mask_values(im), im.size))
  except DatasetError as e:
    return errors + [str(e)], warnings
  if image_wh is not None and mask_wh != image_wh:
    errors.append(str(_size_mismatch(s.image_path, image_wh, s.mask_path, mask_wh)))
  elif s.label and not _binarize(values, threshold).any():
    if values.any():
      why = f'no pixel reaches the defect threshold (max value {values.max()}, threshold {threshold:g})'
    else:
      why = 'all zero'
    warnings.append(f'{s.mask_path}: mask of defect image {s.image_path} is empty: {why}')
  return errors, warnings


def check_samples(samples: list[Sample], max_errors: int = 20) -> list[str]:
  """Reads every image and mask of `samples` once, before training.

  Raises DatasetError listing the unreadable files and the masks whose size differs from their
  image's (both after EXIF orientation). Returns (and logs) warnings: defect images whose mask is
  empty after binarisation (see load_mask). The error names at most `max_errors` problems.
  """
  errors, warnings = [], []
  for s in samples:
    e, w = _check_sample(s)
    errors += e
    warnings += w
  for w in warnings:
    logging.warning('%s', w)
  if errors:
    more = f'\n... and {len(errors) - max_errors} more' if len(errors) > max_errors else ''
    raise DatasetError(
      f'{len(errors)} problem{"s" * (len(errors) != 1)} in the dataset:\n'
      + '\n'.join(errors[:max_errors])
      + more
    )
  return warnings
