"""Mask-ViT-GAN: U-ViT GAN, multi-scale complementary block masks, ToMe discriminator (mask_vit_gan_tome.txt).

configs/mask_vitgan.py        minutes on a CPU on the embedded synthetic dataset (64x64, small ViTs).
configs/mask_vitgan.py:paper  Sec. 3.2: 13 blocks in the generator encoder and decoder (and the extra
                              encoder), 8 in the discriminator, ToMe r=2, AdamW 1e-4, batch 8,
                              500 epochs, alpha = (1, 1, 20), one model per category.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = common.get_config()
  c.model.name = 'mask_vitgan'
  c.dataset.image_size = 64
  c.batch_size = 16
  c.num_epochs = 20
  c.eval_batch_size = 16  # x6 masked copies through the generator at test time.
  c.log_every = 20
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 2e-3  # 5e-4 left bottle at image AUROC 0.50 after 300 steps (2e-3: 0.89).
  c.optimizer.warmup_steps = 20
  c.optimizer.schedule = 'cosine'
  c.optimizer.kwargs = ml_collections.ConfigDict({'b1': 0.5, 'b2': 0.999, 'weight_decay': 1e-4})
  c.image_score = 'max_zscore'  # Final map's maximum after per-pixel standardisation against the
  # training maps (the paper leaves the score open; in place of
  # mvg.image_score): image AUROC 55.6 -> 64.0 embedded, 89.6 -> 97.0 bottle.

  c.mvg = ml_collections.ConfigDict()
  # Generator: U-ViT encoder-decoder (the extra encoder for L_enc has the encoder's architecture).
  c.mvg.patch_size = 8  # Pixels per patch side.
  c.mvg.width = 96  # Token width of encoder and decoder.
  c.mvg.depth = 3  # Transformer blocks in the encoder, and as many in the decoder.
  c.mvg.num_heads = 4
  c.mvg.mlp_ratio = 4.0
  c.mvg.latent_dim = 32  # Width of the latent tokens z (bottleneck; L_enc compares z, z_hat).
  c.mvg.long_skips = True  # U-ViT long skips (encoder block i -> decoder block depth-1-i).
  c.mvg.out_conv = True  # 3x3 convolution after the decoder.
  c.mvg.small_head = True  # Grey start: small patch-head init, +0.5, residual zero-init conv.
  # Discriminator: ViT with token merging, sigmoid output; `middle` features for L_adv.
  c.mvg.disc_patch_size = 8
  c.mvg.disc_width = 64
  c.mvg.disc_depth = 3
  c.mvg.disc_num_heads = 4
  c.mvg.disc_feature_dim = 64
  c.mvg.tome_r = 2  # Tokens merged in every discriminator block (0 = plain ViT).
  # Masks and losses.
  c.mvg.mask_cells = (2, 4, 8)  # Checkerboard blocks per side at the three scales (even numbers).
  c.mvg.alpha = (1.0, 1.0, 20.0)  # (adversarial, encoder, consistency) weights of Eq. 5.
  # Not in the paper: L_con's SSIM and gradient terms get weight 0 before generator step `start`, rising
  # linearly to 1 at `end`; (0, 0) is Eq. 1 from the first step. (100, 150) keeps the generator
  # input-dependent on embedded connector, but scored lower there (README, Mask-ViT-GAN point 3).
  c.mvg.structure_warmup = (0, 0)
  # Test-time scoring (Eq. 6-9).
  c.mvg.error = 'l1'  # E_i per pixel: 'l1' |O_i - I| or 'l2' (O_i - I)^2, channel mean.
  c.mvg.select = 'eq8'  # 'eq8' argmax(avg(E_i) - mu), 'distance' argmax |.|, 'mean' of E_i.
  c.mvg.smoothing_sigma = 2.0  # Gaussian sigma (pixels) on the final error map.
  c.mvg.image_score = 'max'  # 'max' or 'mean' of the smoothed final map (with image_score='model').

  if arg == 'paper':
    c.dataset.image_size = 256
    c.dataset.unified = False  # One model per category, as the paper's tables.
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_epochs = 500
    c.log_every = 50
    c.checkpoint_every = 1000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = 'constant'
    c.optimizer.kwargs = ml_collections.ConfigDict({'weight_decay': 1e-2})  # torch AdamW default.
    c.image_score = 'model'  # mvg.image_score of the final map.
    c.mvg.patch_size = 16  # ViT 16x16 patches (Fig. 3).
    c.mvg.width = 384  # Not given in the paper: ViT-S width.
    c.mvg.depth = 13
    c.mvg.num_heads = 6
    c.mvg.latent_dim = 128  # Not given in the paper.
    c.mvg.disc_patch_size = 16
    c.mvg.disc_width = 384
    c.mvg.disc_depth = 8
    c.mvg.disc_num_heads = 6
    c.mvg.disc_feature_dim = 256  # Not given in the paper.
    c.mvg.tome_r = 2
    c.mvg.mask_cells = (4, 8, 16)  # 64, 32 and 16 pixel blocks at 256x256.
    c.mvg.alpha = (1.0, 1.0, 20.0)
    c.mvg.smoothing_sigma = 4.0
  elif arg:
    raise ValueError(f'Unknown mask_vitgan variant {arg!r}; expected "" or "paper".')
  return c
