"""Mask-ViT-GAN: tokens merged per discriminator block (0 = plain ViT discriminator) x U-ViT long skips.

python -m jaxad.sweep --config configs/mask_vitgan.py --sweep configs/sweeps/mask_vitgan_tome.py --seeds 3
"""

from jaxad.sweep import grid


def get_sweep(arg=None) -> list[dict]:
  del arg
  return grid({'mask_vitgan.tome_r': [0, 2, 4], 'mask_vitgan.long_skips': [True, False]})
