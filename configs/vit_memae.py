"""ViT-Mem-CA: ViT autoencoder + memory module + coordinate attention (docs/models/vit_memae.md).

  configs/vit_memae.py        the embedded dataset on a CPU: 128x128, P=16, D=128, 4 blocks, one model
                              per category, 20 epochs.
  configs/vit_memae.py:paper  the paper's protocol (Sec. 4.2): 384x384, P=16, D=768, 12 blocks, 8 heads,
                              Adam 2e-4, batch 8, 200 epochs, lambda_recon 1, lambda_ent 0.001, one model
                              per category.
  configs/vit_memae.py:btad   :paper on BeanTech AD's folder layout (train/ok, test/ok|ko, ground_truth/ko).

Table 6 ablation: append ',base', ',mem', ',ca' or ',full' to any variant (e.g. `:paper,base`, `:,mem`),
or set --config.vit_memae.use_memory / --config.vit_memae.use_coord_attention directly. Where CA sits:
--config.vit_memae.coord_attention_placement=after_memory|before_memory.
"""

import ml_collections

from configs import common

_ABLATIONS = {  # Table 6 rows: (use_memory, use_coord_attention).
  'base': (False, False),
  'mem': (True, False),
  'ca': (False, True),
  'full': (True, True),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant, ablations = common.parse_arg(arg, 'vit_memae', variants=('paper', 'btad'), flags=_ABLATIONS)
  c = common.get_config()
  c.model.name = 'vit_memae'
  c.dataset.image_size = 128
  c.dataset.unified = False  # One model per category, as in the paper.
  c.batch_size = 8
  c.num_epochs = 20
  c.eval_batch_size = 16
  c.log_every = 5
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.kwargs = ml_collections.ConfigDict()  # Plain Adam (optax.adam takes no weight_decay).
  c.optimizer.warmup_steps = 10
  c.optimizer.schedule = 'cosine'

  c.vit_memae = ml_collections.ConfigDict()
  c.vit_memae.patch_size = 16  # P: patch size; a power of two (the decoder doubles log2(P) times).
  c.vit_memae.width = 128  # D: token width = memory item width C.
  c.vit_memae.depth = 4  # L: Transformer blocks of the encoder.
  c.vit_memae.num_heads = 4  # Attention heads.
  c.vit_memae.mlp_ratio = 4.0  # MLP hidden width / D.
  # True: the encoder's blocks as one nn.scan over stacked params (compiled once; the :paper train
  # step in ~0.7x the CPU time, docs/performance.md). Changes the parameter layout of checkpoints.
  c.vit_memae.scan_blocks = False
  c.vit_memae.use_memory = True  # Table 6 "M": memory module between encoder and decoder.
  c.vit_memae.num_memory = 100  # N: memory items (not given in the paper; MemAE uses 100 for images).
  c.vit_memae.shrink_scale = 1.0  # Hard-shrinkage threshold lambda = shrink_scale / N (Eq. 10: 1/N); 0 = off.
  c.vit_memae.memory_temperature = 1.0  # Softmax over cos / temperature (Eq. 8: 1).
  c.vit_memae.use_coord_attention = True  # Table 6 "CA": coordinate attention.
  # Where CA sits: 'after_memory' (Fig. 2 and Sec. 3: "the feature maps F' computed by the memory network
  # are conveyed to the CA module") or 'before_memory' (Sec. 3.3: "positioned between the memory module
  # and the encoder"). Without the memory both are encoder -> CA -> decoder.
  c.vit_memae.coord_attention_placement = 'after_memory'
  c.vit_memae.ca_reduction = 32  # CA hidden width = max(8, D // reduction) (Hou et al. default).
  # The decoder's output layer. 'deconv' (Sec. 3.4): the last of the six transposed convs outputs the
  # image channels into tanh, the others have BN + ReLU. 'conv': all six have BN + ReLU, then a 3x3 conv
  # to the image channels and tanh (one layer more than the paper); it localises better at this size
  # (docs/models/vit_memae.md, Readings). Changes the parameter layout of checkpoints.
  c.vit_memae.decoder_output = 'conv'
  # Widths of the transposed convs that have BN + ReLU (not given in the paper): six with 'conv', five
  # with 'deconv' (the sixth outputs the image channels).
  c.vit_memae.decoder_channels = (128, 128, 64, 32, 32, 16)
  # Strides of the six transposed convs (1: 3x3 kernel, 2: 4x4, doubling the map); their product must be
  # patch_size. The paper gives no order: size-keeping stages first is ~3x cheaper on CPU than last.
  c.vit_memae.decoder_strides = (1, 1, 2, 2, 2, 2)
  c.vit_memae.lambda_recon = 1.0  # Eq. 15 weight of the reconstruction loss.
  # Eq. 11's L2 = (1/WH) ||X - X_hat||^2: 'sum' over the channels as written; 'mean' also divides by C
  # (C times weaker against lambda_ssim and lambda_ent).
  c.vit_memae.l2_channels = 'sum'
  c.vit_memae.lambda_ssim = 1.0  # Eq. 13 lambda of the block-SSIM term (the paper gives no value).
  c.vit_memae.lambda_ent = 0.001  # Eq. 15 weight of the addressing-weight entropy (Eq. 14).
  c.vit_memae.ssim_filter_size = 11  # SSIM window (Gaussian, dm-pix / skimage default).
  c.vit_memae.ssim_sigma = 1.5  # SSIM Gaussian sigma.
  c.vit_memae.map_ssim_weight = 1.0  # Anomaly map = squared error + weight * (1 - SSIM); 0: L2 only.
  c.vit_memae.smoothing_sigma = 4.0  # Gaussian sigma (pixels at image_size) of the final map.

  if variant in ('paper', 'btad'):
    c.dataset.image_size = 384
    c.eval_batch_size = 8
    c.num_epochs = 200
    c.log_every = 50
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = 'constant'
    c.vit_memae.width = 768
    c.vit_memae.num_heads = 8
    c.vit_memae.depth = 12  # ViT-B's: D = 768 and "the network's default configuration" (Sec. 4.2).
    c.vit_memae.num_memory = 2000  # Not given; MemAE's code default.
    c.vit_memae.decoder_output = 'deconv'
    c.vit_memae.decoder_channels = (512, 512, 256, 128, 64)
    if variant == 'btad':
      c.dataset.name = 'folder'
      c.dataset.root = ''  # The BTAD root (01/, 02/, 03/ with train/ok, test/ok|ko, ground_truth/ko).
      c.dataset.good_name = 'ok'
      c.dataset.mask_suffix = ''  # ground_truth/ko/0000.png masks test/ko/0000.bmp.
  for name in ablations:
    c.vit_memae.use_memory, c.vit_memae.use_coord_attention = _ABLATIONS[name]
  return c
