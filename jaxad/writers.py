"""Run outputs: atomic text/JSON files, strict JSON, and scalar logs (JSONL and TensorBoard events)."""

import json
import math
import os
import secrets

import numpy as np


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically: see `atomic_write_bytes`."""
  atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see either the old file or the whole new one.

  The data goes to a temporary file in the same directory, is flushed and fsynced, and replaces `path`
  with `os.replace`. On any failure the temporary file is removed and `path` is left as it was.

  Raises:
    OSError: naming `path`, if writing or replacing fails (an interrupt is re-raised as it is).
  """
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f'.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # The umask applies, as with open().
  except OSError as e:
    raise OSError(f'Could not write {path}: {type(e).__name__}: {e}') from e
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    if isinstance(e, Exception):
      raise OSError(f'Could not write {path}: {type(e).__name__}: {e}') from e
    raise


def json_safe(obj):
  """`obj` with numpy scalars and arrays as Python values and every NaN/Inf float as None.

  Dicts, lists and tuples are converted recursively (tuples become lists); other objects are returned
  as they are.
  """
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def dumps_json(obj, indent: int | None = 2) -> str:
  """Strict JSON text of `json_safe(obj)`: NaN and Inf are written as null, never bare."""
  return json.dumps(json_safe(obj), indent=indent, allow_nan=False) + '\n'


def atomic_write_json(path: str, obj, indent: int | None = 2) -> None:
  """Writes `obj` to `path` as strict JSON (`dumps_json`), atomically (`atomic_write_text`).

  Raises:
    TypeError: naming `path`, if `obj` does not serialise (an existing file is left as it was).
    OSError: naming `path`, if the file cannot be written (an existing file is left as it was).
  """
  try:
    text = dumps_json(obj, indent)
  except (TypeError, ValueError) as e:
    raise (TypeError if isinstance(e, TypeError) else ValueError)(f'Could not write {path}: {e}') from e
  atomic_write_text(path, text)


def read_json(path: str):
  """The parsed contents of the JSON file `path`.

  Raises:
    ValueError: naming `path`, if it cannot be read or is not valid JSON (empty, truncated, ...).
  """
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: unreadable ({type(e).__name__}: {e})') from e


def read_metrics(path: str) -> dict:
  """A metrics.json written by `evaluate.write_results`: valid JSON with a 'mean' dict.

  Raises:
    ValueError: naming `path`, if it is unreadable, not valid JSON, or has no 'mean' dict.
  """
  metrics = read_json(path)
  if not isinstance(metrics, dict) or not isinstance(metrics.get('mean'), dict):
    raise ValueError(f"{path}: unreadable (no 'mean' dict)")
  return metrics


class MetricWriter:
  """Writes `{step, **scalars}` lines to <workdir>/log.jsonl and scalars to <workdir>/tb/.

  Only process 0 writes; on other processes every call is a no-op.
  """

  def __init__(self, workdir: str):
    import jax

    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'log.jsonl'), 'a')
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write_scalars(self, step: int, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
