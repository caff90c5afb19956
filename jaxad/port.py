"""Port a backbone checkpoint to jaxad's ``.npz`` weight format (no torch needed).

    python -m jaxad.port --arch efficientnet_b4 --checkpoint timm_b4.safetensors --out b4.npz
    python -m jaxad.port --arch tf_efficientnet_lite0 --checkpoint imagenet --out lite0.npz
    python -m jaxad.port --list

``--checkpoint`` is a timm/torch state dict (``.safetensors``, ``.pth``, ``.pt``, ``.bin``),
an ONNX model for the VGG16 Keras conv base (``.onnx``), or a weights name that resolves
offline (``imagenet``). The conversion is strict: a file for another architecture fails
with the list of missing/unexpected keys. Load the result with
``jaxad.models.backbones.load(ARCH, weights=OUT)``, or put it at
``~/.cache/jaxad/weights/ARCH.npz`` (or in ``$JAXAD_WEIGHTS``) so that
``weights='imagenet'`` finds it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
  import jax

  from jaxad.models import backbones
  from jaxad.models.backbones import registry
  from jaxad.models.backbones.common import PREPROCESS_DOC

  p = argparse.ArgumentParser(prog='python -m jaxad.port', description=__doc__.split('\n\n')[0])
  p.add_argument('--arch', help='backbone name, see --list')
  p.add_argument('--checkpoint', help="checkpoint file, or a weights name such as 'imagenet'")
  p.add_argument('--out', help='output .npz')
  p.add_argument(
    '--preprocess',
    choices=sorted(PREPROCESS_DOC),
    default=None,
    help="preprocessing the weights expect (default: implied by the file or the arch's timm default)",
  )
  p.add_argument('--list', action='store_true', help='list architectures and exit')
  a = p.parse_args(argv)
  if a.list:
    for name in registry.available_archs():
      info = registry.arch_info(name)
      print(
        f'{name:26s} channels={info.channels} strides={info.strides} preprocess={info.default_preprocess}'
      )
    return 0
  if not (a.arch and a.checkpoint and a.out):
    p.error('--arch, --checkpoint and --out are required')
  if not a.out.endswith('.npz'):
    p.error('--out must end with .npz')
  registry.arch_info(a.arch)
  t0 = time.perf_counter()
  path = a.checkpoint
  if not os.path.exists(path):
    path = registry.resolve_weights(a.arch, a.checkpoint)
  try:
    variables, implied, source = registry.read_weights(a.arch, path)
  except backbones.StrictLoadError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  pre = a.preprocess or implied or registry.arch_info(a.arch).default_preprocess
  registry.save_npz(a.out, variables, arch=a.arch, preprocess=pre, source=os.path.basename(source))
  n = sum(int(v.size) for v in jax.tree.leaves(variables))
  print(
    f'{a.arch}: {n:,} values from {source} -> {a.out} (preprocess={pre}, {time.perf_counter() - t0:.1f}s)'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
