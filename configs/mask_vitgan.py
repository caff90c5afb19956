"""Mask-ViT-GAN: U-ViT GAN, multi-scale complementary block masks, ToMe discriminator.

See docs/models/mask_vitgan.md.

  configs/mask_vitgan.py        minutes on a CPU on the embedded dataset (64x64, small ViTs, 20 epochs).
  configs/mask_vitgan.py:paper  Sec. 3.2: a U-ViT generator of 13 blocks (6 + 1 + 6; the extra encoder
                                has the 6 in-blocks), 8 in the discriminator, ToMe r=2, AdamW 1e-4, batch 8,
                                500 epochs, alpha = (1, 1, 20), 256x256, one model per category.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant, _ = common.parse_arg(arg, 'mask_vitgan', variants=('paper',))
  c = common.get_config()
  c.model.name = 'mask_vitgan'
  c.dataset.image_size = 64
  # Batch 8: twice the updates of batch 16 in 20 epochs; bottle's pixel AUROC goes from 73.7 to 89.8
  # (docs/models/mask_vitgan.md, rows B3-B4).
  c.batch_size = 8
  c.num_epochs = 20
  c.eval_batch_size = 16  # x6 masked copies through the generator at test time.
  c.log_every = 20
  c.optimizer.learning_rate = 2e-3  # Lower rates leave the generator on a plateau (see the model doc).
  c.optimizer.warmup_steps = 20
  c.optimizer.schedule = 'cosine'
  c.optimizer.kwargs = ml_collections.ConfigDict({'b1': 0.5, 'b2': 0.999, 'weight_decay': 1e-4})
  c.image_score = 'max_zscore'  # The paper leaves the image score open (see the model doc).

  c.mask_vitgan = m = ml_collections.ConfigDict()
  # Generator: U-ViT (the extra encoder for L_enc has the architecture of its patch embedding + in-blocks).
  m.patch_size = 8  # Pixels per patch side.
  m.width = 96  # Token width of the generator and the extra encoder.
  m.depth = 7  # U-ViT blocks in all, odd: (depth - 1) / 2 in-blocks, 1 mid-block, as many out-blocks.
  m.num_heads = 4  # Attention heads of the generator and the extra encoder.
  m.mlp_ratio = 4.0  # MLP hidden width / token width (generator and discriminator).
  m.share_encoder = False  # True: the extra encoder is the generator's encoder (shared weights).
  # True: the in-blocks and the out-blocks (with their skip linears) of the generator and the extra
  # encoder each as one nn.scan over stacked params, compiled once. Changes the parameter layout of
  # checkpoints; ONNX export needs False (docs/deploy.md).
  m.scan_blocks = False
  m.long_skips = True  # U-ViT long skips (in-block i -> out-block (depth - 1) / 2 - 1 - i).
  m.out_conv = True  # 3x3 convolution after the decoder.
  m.small_head = True  # Grey start: small patch-head init, +0.5, residual zero-init conv.
  # Discriminator: ViT with token merging, sigmoid output; `middle` features for L_adv.
  m.disc_patch_size = 8  # Pixels per patch side.
  m.disc_width = 64  # Token width.
  m.disc_depth = 3  # Transformer (ToMe) blocks.
  m.disc_num_heads = 4  # Attention heads.
  m.disc_feature_dim = 64  # Width of the feature vector L_adv compares.
  m.tome_r = 2  # Tokens merged in every discriminator block (0 = plain ViT).
  # Masks and losses.
  m.mask_cells = (2, 4, 8)  # Checkerboard blocks per side at the three scales (even numbers).
  m.alpha = (1.0, 1.0, 20.0)  # (adversarial, encoder, consistency) weights of Eq. 5.
  # Not in the paper: L_con's SSIM and gradient terms get weight 0 before generator step `start`, rising
  # linearly to 1 at `end`; (0, 0) is Eq. 1 from the first step.
  m.structure_warmup = (0, 0)
  # Test-time scoring (Eq. 6-9).
  m.error = 'l1'  # E_i per pixel: 'l1' |O_i - I| or 'l2' (O_i - I)^2, channel mean.
  # 'eq8' argmax_i(avg(E_i) - mu_i), mu_i fitted per category on the training images; 'distance' argmax |.|;
  # 'mean' of the E_i.
  m.select = 'eq8'
  m.smoothing_sigma = 2.0  # Gaussian sigma (pixels) on the final error map; 0 = none.
  m.image_score = 'max'  # 'max' or 'mean' of the smoothed final map (with image_score='model').

  if variant == 'paper':
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
    c.image_score = 'model'  # mask_vitgan.image_score of the final map.
    m.patch_size = 16  # ViT 16x16 patches (Fig. 3).
    m.width = 384  # Not given in the paper: ViT-S width.
    m.depth = 13  # "13 Transformer blocks" (Sec. 3.2): U-ViT's 6 in-blocks + 1 mid-block + 6 out-blocks.
    m.num_heads = 6
    m.disc_patch_size = 16
    m.disc_width = 384
    m.disc_depth = 8
    m.disc_num_heads = 6
    m.disc_feature_dim = 256  # Not given in the paper.
    m.mask_cells = (4, 8, 16)  # 64, 32 and 16 pixel blocks at 256x256.
    # Scoring in the paper's lineage (SCADN): squared error, Eq. 8 with mu_i, no smoothing, mean of E_f.
    m.error = 'l2'
    m.select = 'eq8'
    m.smoothing_sigma = 0.0
    m.image_score = 'mean'
    m.scan_blocks = True  # The train step compiles in ~0.75x the time (docs/performance.md).
  return c
