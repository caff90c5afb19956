"""Read PyTorch checkpoints (and safetensors) into numpy without importing torch.

Two on-disk formats written by ``torch.save`` are supported:

* the zip format (torch >= 1.6): ``<prefix>/data.pkl`` holds the pickled object,
  ``<prefix>/data/<key>`` the raw bytes of each storage, ``<prefix>/byteorder``
  optionally says ``little``/``big``;
* the legacy format: five consecutive pickles (magic number, protocol version,
  system info, the object, the list of storage keys) followed by every storage as
  an int64 element count and its raw bytes.

The object pickle is read with a *restricted* unpickler: only the handful of
globals torch uses to rebuild tensors and state dicts are resolved, anything else
raises :class:`UnsafeCheckpointError`. Nothing from the file is ever executed.

``.safetensors`` files are read with ``safetensors.numpy`` when that package is
installed, else with the small built-in reader below (the format is a JSON header
plus raw little-endian buffers).
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

try:  # bfloat16 for numpy; ships with jax.
  import ml_dtypes

  _BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - jax always brings ml_dtypes
  _BF16 = None

__all__ = [
  'UnsafeCheckpointError',
  'load_torch_checkpoint',
  'load_safetensors',
  'load_state_dict',
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype
_STORAGE_DTYPES: dict[str, np.dtype | None] = {
  'DoubleStorage': np.dtype('<f8'),
  'FloatStorage': np.dtype('<f4'),
  'HalfStorage': np.dtype('<f2'),
  'BFloat16Storage': _BF16,
  'LongStorage': np.dtype('<i8'),
  'IntStorage': np.dtype('<i4'),
  'ShortStorage': np.dtype('<i2'),
  'CharStorage': np.dtype('i1'),
  'ByteStorage': np.dtype('u1'),
  'BoolStorage': np.dtype('?'),
  'UntypedStorage': np.dtype('u1'),
}

_SAFETENSORS_DTYPES = {
  'F64': np.dtype('<f8'),
  'F32': np.dtype('<f4'),
  'F16': np.dtype('<f2'),
  'BF16': _BF16,
  'I64': np.dtype('<i8'),
  'I32': np.dtype('<i4'),
  'I16': np.dtype('<i2'),
  'I8': np.dtype('i1'),
  'U64': np.dtype('<u8'),
  'U32': np.dtype('<u4'),
  'U16': np.dtype('<u2'),
  'U8': np.dtype('u1'),
  'BOOL': np.dtype('?'),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint references a Python global outside the allow-list."""


# --------------------------------------------------------------------------- placeholders


class _StorageType:
  """Stands in for ``torch.FloatStorage`` & co. inside the pickle."""

  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES or _STORAGE_DTYPES[name] is None:
      raise UnsafeCheckpointError(f'unsupported torch storage type torch.{name}')
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _Storage:
  """A storage whose bytes may arrive later (legacy format)."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.array: np.ndarray | None = None

  def get(self) -> np.ndarray:
    if self.array is None:
      raise pickle.UnpicklingError(f'storage {self.key!r} has no data in the checkpoint')
    return self.array


class _StorageView:
  """Legacy ``view_metadata``: a slice of another storage."""

  def __init__(self, base: _Storage, offset: int, size: int):
    self.base, self.offset, self.size = base, offset, size
    self.dtype = base.dtype

  def get(self) -> np.ndarray:
    return self.base.get()[self.offset : self.offset + self.size]


class _LazyTensor:
  def __init__(self, storage, offset: int, size, stride):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def materialize(self) -> np.ndarray:
    flat = self.storage.get()
    if not self.size:
      return np.array(flat[self.offset])
    need = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, flat.dtype)
    if need > flat.size:
      raise pickle.UnpicklingError(
        f'tensor of size {self.size} stride {self.stride} offset {self.offset} '
        f'overruns its storage of {flat.size} elements'
      )
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      flat[self.offset :], shape=self.size, strides=[s * item for s in self.stride], writeable=False
    )
    return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  # Tensor subclasses (e.g. nn.Parameter saved by newer torch); keep the plain tensor.
  return func(*args)


class _TorchSize(tuple):
  pass


def _torch_device(*args):
  return str(args[0]) if args else 'cpu'


def _numpy_scalar(dtype, data=None):
  return np.frombuffer(data, dtype=dtype)[0] if data is not None else dtype.type()


def _ordered_dict(*args, **kwargs):
  return collections.OrderedDict(*args, **kwargs)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
  ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
  ('torch', 'Size'): _TorchSize,
  ('torch', 'device'): _torch_device,
  ('builtins', 'set'): set,
  ('builtins', 'frozenset'): frozenset,
  ('builtins', 'slice'): slice,
  ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
  ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
  ('numpy', 'dtype'): np.dtype,
}
for _name in _STORAGE_DTYPES:
  _ALLOWED_GLOBALS[('torch', _name)] = _name  # resolved to a _StorageType below
_ALLOWED_GLOBALS[('torch.storage', 'UntypedStorage')] = 'UntypedStorage'


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, file: BinaryIO, persistent_load=None):
    super().__init__(file, encoding='latin1')
    self._persistent = persistent_load

  def find_class(self, module: str, name: str):
    try:
      obj = _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f'checkpoint references the global {module}.{name}, which is not on the '
        'allow-list of torch_pickle (only tensors, storages and plain containers '
        'are accepted); re-save the checkpoint as a plain state_dict'
      ) from None
    return _StorageType(obj) if isinstance(obj, str) else obj

  def persistent_load(self, pid):
    if self._persistent is None:
      raise pickle.UnpicklingError('unexpected persistent id in a plain pickle')
    return self._persistent(pid)


# --------------------------------------------------------------------------- readers


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, collections.OrderedDict):
    out = collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
    meta = getattr(obj, '_metadata', None)
    if meta is not None:
      out._metadata = meta  # type: ignore[attr-defined]
    return out
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialize(v) for v in obj]
  if isinstance(obj, tuple) and not isinstance(obj, _TorchSize):
    return tuple(_materialize(v) for v in obj)
  return obj


def _parse_pid(pid) -> tuple[str, _StorageType, str, int]:
  if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
    raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
  _, storage_type, key, _location, numel, *rest = pid
  if not isinstance(storage_type, _StorageType):
    raise UnsafeCheckpointError(f'unexpected storage type {storage_type!r}')
  return str(key), storage_type, int(numel), (rest[0] if rest else None)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pkl) != 1:
      raise pickle.UnpicklingError(f'{path}: not a torch zip checkpoint (no <prefix>/data.pkl)')
    prefix = pkl[0][: -len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = zf.read(prefix + 'byteorder').decode().strip()
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
      key, stype, numel, _ = _parse_pid(pid)
      if key not in storages:
        raw = zf.read(f'{prefix}data/{key}')
        dtype = stype.dtype if byteorder == 'little' else stype.dtype.newbyteorder('>')
        if stype.name == 'UntypedStorage':
          numel = len(raw)
        if len(raw) != numel * dtype.itemsize:
          raise pickle.UnpicklingError(f'storage {key}: {len(raw)} bytes for {numel} x {dtype}')
        st = _Storage(key, stype.dtype, numel)
        arr = np.frombuffer(raw, dtype=dtype)
        st.array = arr.astype(stype.dtype) if byteorder != 'little' else arr
        storages[key] = st
      return storages[key]

    with zf.open(pkl[0]) as f:
      obj = _RestrictedUnpickler(io.BytesIO(f.read()), persistent_load).load()
  return _materialize(obj)


def _load_legacy(f: BinaryIO, path: str) -> Any:
  def plain():
    return _RestrictedUnpickler(f).load()

  magic = plain()
  if magic != _LEGACY_MAGIC:
    raise pickle.UnpicklingError(f'{path}: not a torch checkpoint (bad magic number)')
  protocol = plain()
  if protocol != _LEGACY_PROTOCOL:
    raise pickle.UnpicklingError(f'{path}: unsupported legacy protocol {protocol}')
  sys_info = plain()
  if not sys_info.get('little_endian', True):
    raise pickle.UnpicklingError(f'{path}: big-endian legacy checkpoints are not supported')
  storages: dict[str, _Storage] = {}

  def persistent_load(pid):
    key, stype, numel, view = _parse_pid(pid)
    if key not in storages:
      storages[key] = _Storage(key, stype.dtype, numel)
    base = storages[key]
    if view is not None:
      _view_key, offset, size = view
      return _StorageView(base, int(offset), int(size))
    return base

  obj = _RestrictedUnpickler(f, persistent_load).load()
  keys = plain()
  for key in keys:
    st = storages.get(str(key))
    if st is None:
      raise pickle.UnpicklingError(f'{path}: data for unknown storage {key!r}')
    (n,) = struct.unpack('<q', f.read(8))
    if n != st.numel:
      raise pickle.UnpicklingError(f'{path}: storage {key} holds {n} elements, expected {st.numel}')
    nbytes = n * st.dtype.itemsize
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise pickle.UnpicklingError(f'{path}: truncated data for storage {key}')
    st.array = np.frombuffer(raw, dtype=st.dtype)
  return _materialize(obj)


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Unpickle a ``torch.save`` file; tensors come back as numpy arrays."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  with open(path, 'rb') as f:
    return _load_legacy(f, path)


def _read_safetensors_builtin(path: str) -> dict[str, np.ndarray]:
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for key, info in header.items():
    if key == '__metadata__':
      continue
    dtype = _SAFETENSORS_DTYPES.get(info['dtype'])
    if dtype is None:
      raise ValueError(f'{path}: unsupported safetensors dtype {info["dtype"]} for {key}')
    start, end = info['data_offsets']
    arr = np.frombuffer(data[start:end], dtype=dtype).reshape(info['shape'])
    out[key] = arr.copy()
  return out


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a ``.safetensors`` file (``safetensors.numpy`` if installed, else built-in)."""
  path = os.fspath(path)
  try:
    from safetensors.numpy import load_file
  except ImportError:
    return _read_safetensors_builtin(path)
  try:
    return {k: np.asarray(v) for k, v in load_file(path).items()}
  except (TypeError, ValueError):  # e.g. bf16, which safetensors.numpy cannot map
    return _read_safetensors_builtin(path)


_WRAPPER_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model', 'module', 'params')


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
  if isinstance(obj, np.ndarray):
    out[prefix] = obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(v, f'{prefix}.{k}' if prefix else str(k), out)
  # other leaves (ints, strings, metadata) are dropped


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Load a checkpoint as a flat ``{name: array}`` state dict.

  Accepts ``.safetensors`` and torch files (``.pth``/``.pt``/``.bin``/``.ckpt``).
  A training checkpoint that wraps the weights (``{'state_dict': ...}``,
  ``{'model': ...}``, ...) is unwrapped; a ``module.`` prefix (DataParallel) is removed.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(path)
  if path.endswith('.safetensors'):
    sd = load_safetensors(path)
  else:
    obj = load_torch_checkpoint(path)
    if isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
      for k in _WRAPPER_KEYS:
        if isinstance(obj.get(k), dict):
          obj = obj[k]
          break
    if not isinstance(obj, dict):
      raise ValueError(f'{path}: expected a state dict, got {type(obj).__name__}')
    sd = {}
    _flatten(obj, '', sd)
  if sd and all(k.startswith('module.') for k in sd):
    sd = {k[len('module.') :]: v for k, v in sd.items()}
  return sd
