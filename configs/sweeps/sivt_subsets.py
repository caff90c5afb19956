"""SIVT Sec. IV-C.3, effect of the subset number N (and its cost); `:fine` adds N = 32 and 64.

N must divide the token count, (feature_size / patch_size)^2: 64 by default, 256 at `:paper`.

python -m jaxad.sweep --config configs/sivt.py:paper --sweep configs/sweeps/sivt_subsets.py --seeds 5
"""

from jaxad.sweep import grid


def get_sweep(arg=None) -> list[dict]:
  subsets = [2, 4, 8, 16, 32, 64] if arg == 'fine' else [2, 4, 8, 16]
  return grid({'sivt.num_subsets': subsets})
