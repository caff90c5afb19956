"""Scalar logging without TensorFlow: a JSONL log and TensorBoard event files (tensorboardX)."""

import json
import os

import jax
import numpy as np


class MetricWriter:
  """Writes `{step, **scalars}` lines to <workdir>/log.jsonl and scalars to <workdir>/tb/.

  Only process 0 writes; on other processes every call is a no-op.
  """

  def __init__(self, workdir: str):
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
