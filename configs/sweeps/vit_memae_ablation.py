"""ViT-Mem-CA Table 6: base / +memory / +coordinate attention / both.

python -m jaxad.sweep --config configs/vit_memae.py:paper \
  --sweep configs/sweeps/vit_memae_ablation.py --seeds 5
"""

from jaxad.sweep import grid


def get_sweep(arg=None) -> list[dict]:
  del arg
  return grid({'vit_memae.use_memory': [False, True], 'vit_memae.use_coord_attention': [False, True]})
