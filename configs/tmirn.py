"""TMIRN: multi-scale Transformer reconstruction GAN (docs/models/tmirn.md).

  configs/tmirn.py        the embedded synthetic dataset (incl. the infrared-like ring_seal) on a CPU:
                          64x64, the paper's architecture with base width 8 (8 ... 128 channels)
                          and one PVT block per ViT module in G, a conv-only D.
  configs/tmirn.py:paper  Sec. IV-C: 224x224, base width 32 (Table I: 128x28x28, 256x14x14,
                          512x7x7), Adam 2e-4 betas (0.5, 0.999), 200 epochs, random flips and
                          +-10 degree rotations, one model per category; float32, the skip at
                          z_low (Sec. III-E), E_pos in every PVT block (Eq. 5), ||.||_2 as the
                          per-sample norm in Eq. 15-19.

Ablations (Sec. IV-E), on any variant: --config.tmirn.num_skips=0..3 (Fig. 14; from
--config.tmirn.skip_from=deepest|lowest), --config.tmirn.use_maff
(Table IV), --config.tmirn.score_parts=image|feature|both and --config.tmirn.smooth_kernels='()' (Table VI).
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant, _ = common.parse_arg(arg, 'tmirn', variants=('paper',))
  c = common.get_config()
  c.model.name = 'tmirn'
  c.dataset.image_size = 64  # Must be a multiple of 32 (five stride-2 levels).
  # Batch 8 and peak rate 2e-3: twice the updates of batch 16 at twice the step size, in 1.5x the
  # training time; bottle's pixel AUROC goes from 41.7 to 80.6 (docs/models/tmirn.md, rows B1-B9).
  c.batch_size = 8
  c.num_epochs = 8
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.kwargs = ml_collections.ConfigDict({'b1': 0.5, 'b2': 0.999})
  c.optimizer.warmup_steps = 10
  c.optimizer.schedule = 'cosine'
  c.image_score = 'max_zscore'  # The paper does not say how it scores images (see the model doc).

  c.tmirn = ml_collections.ConfigDict()
  # Architecture (G and D share the MTFE/MAFF layout).
  c.tmirn.base_width = 8  # Channels at S/2; doubled per level up to 16x at S/32 (paper 32).
  c.tmirn.disc_base_width = 8  # The discriminator's base width (the paper's D = its encoder).
  c.tmirn.vit_depth = 1  # PVT blocks per ViT module (Fig. 5: two); 0 = conv only.
  # PVT blocks per ViT module of the discriminator (paper: as G's). 0, a conv-only D, keeps the CPU
  # compile time short: the gradient penalty differentiates D's three MTFEs twice.
  c.tmirn.disc_vit_depth = 0
  c.tmirn.head_dim = 32  # Attention heads = channels // head_dim (at least 1).
  c.tmirn.pool_tokens = 4  # K, V average-pooled with k = H // pool_tokens (Eq. 2-3).
  c.tmirn.mlp_ratio = 4.0  # FFD hidden width / channels (Eq. 6).
  # True: each ViT module's PVT blocks as one nn.scan over stacked params (compiled once per module;
  # nothing to gain at vit_depth 1). Changes the parameter layout of checkpoints.
  c.tmirn.scan_blocks = False
  # True: each encoder layer that several scales run at one shape (level 3: large and medium; levels 4,
  # 5: all three) as one nn.scan over the scales' stacked params, compiled once instead of once per
  # scale. Changes the parameter layout of checkpoints.
  c.tmirn.scan_scales = False
  # Where Eq. 5's learned E_pos is added: 'module_input' (once, to each ViT module's input) or
  # 'every_block' (the module's E_pos added to every PVT block's input, Eq. 5 for each layer l).
  c.tmirn.pos_embed = 'module_input'
  c.tmirn.latent_dim = 64  # Width of the bottleneck's fully connected code (Fig. 8).
  c.tmirn.num_skips = 1  # Skip connections, counted from `skip_from` (Fig. 14: 1 is best).
  # Level of the first skip: 'deepest' (z_high, S/32; Fig. 14 counts "from the deep features"; 2x2 at
  # 64 px) or 'lowest' (z_low, S/8: Sec. III-E "only between the lowest-level features", Table I's
  # 28x28 "low-level feature"). Changes the parameter layout of checkpoints.
  c.tmirn.skip_from = 'deepest'
  c.tmirn.use_maff = True  # MAFF fusion (Eq. 9-11); False: one CBL per level (Table IV).
  # Losses (Eq. 15-20).
  c.tmirn.loss_weights = (0.6, 0.3, 0.1)  # (omega_1 L_i, omega_2 L_f, omega_3 L_adv), Eq. 20.
  c.tmirn.soft_labels = (0.9, 0.1)  # D targets for real and reconstructed images (Eq. 15).
  c.tmirn.gp_weight = 10.0  # lambda of the gradient penalty (Eq. 15).
  c.tmirn.ssim_filter_size = 7  # SSIM window of L_i (Gaussian sigma 1.5; 11 at 224).
  c.tmirn.l2_loss = 'norm'  # ||.||_2 of L_i, L_f (Eq. 17-18): 'norm' = per-sample Euclidean norm
  # (its image gradient has the scale of D's, unit-norm under the GP);
  # 'mse' = mean squared error (then L_adv outweighs L_i ~40x).
  # ||.||_2 of L_D, L_adv (Eq. 15, 19) on D's scalar output: 'mse' = squared error (LSGAN);
  # 'norm' = |D - label|, the same per-sample norm as l2_loss='norm'.
  c.tmirn.adversarial_loss = 'mse'
  c.tmirn.feature_loss_stop_gradient = True  # L_f trains the decoder towards fixed encoder features.
  # Anomaly score (Eq. 12-14).
  c.tmirn.scale_weights = (0.5, 0.3, 0.2)  # lambda_x for (large, medium, small), summing to 1.
  c.tmirn.score_parts = 'both'  # 'both' S_i * S_f, 'image' S_i, 'feature' S_f (Table VI).
  c.tmirn.smooth_kernels = (3, 5, 7)  # Mean-pool kernels of the S_f smoothing (Fig. 9); () = off.
  c.tmirn.image_smoothing_sigma = 1.0  # Gaussian sigma (pixels at image_size) denoising S_i.

  if variant == 'paper':
    # fp32 as the paper trained (PyTorch default); the gradient penalty takes second-order gradients.
    c.dtype = 'float32'
    c.dataset.image_size = 224
    c.dataset.unified = False  # One model per category.
    c.batch_size = 16  # Not given in the paper.
    c.eval_batch_size = 16
    c.num_epochs = 200
    c.log_every = 50
    c.checkpoint_every = 1000
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = 'constant'
    c.image_score = 'model'  # The map's maximum.
    c.augment.hflip = True
    c.augment.vflip = True
    c.augment.rotate = 10.0
    c.tmirn.base_width = 32
    c.tmirn.disc_base_width = 32
    c.tmirn.vit_depth = 2
    c.tmirn.disc_vit_depth = 2
    c.tmirn.scan_blocks = True  # The train step compiles in ~0.6x the CPU time (docs/performance.md).
    c.tmirn.scan_scales = True  # Fewer distinct layers to compile (docs/performance.md).
    c.tmirn.pool_tokens = 7  # K, V pooled to 7x7 (PVTv2-li).
    c.tmirn.latent_dim = 256  # Not given in the paper.
    c.tmirn.pos_embed = 'every_block'
    c.tmirn.skip_from = 'lowest'
    c.tmirn.adversarial_loss = 'norm'  # One reading of ||.||_2 in Eq. 15-19 (docs/models/tmirn.md).
    c.tmirn.ssim_filter_size = 11
    c.tmirn.image_smoothing_sigma = 4.0
  return c
