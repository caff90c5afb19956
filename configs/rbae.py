"""RB-AE: reference-based autoencoder, two training phases (docs/models/rbae.md).

  configs/rbae.py          the embedded dataset's textures (weave, marble) on a CPU: 64x64, one model per
                           category, 12 epochs 'reconstruct' then 8 'repair' (150 steps of batch 8 each).
  configs/rbae.py:paper    Sec. IV-A: 256x256, Adam 1e-4 with coupled L2 weight decay 1e-5, 400 + 200
                           epochs, one model per category, MVTec AD carpet, grid, leather, tile, wood
                           (--config.dataset.root), DRAEM's defects filled from --config.defects.fill_root.

Append ',no_rbam' to any variant (`:,no_rbam`, `:paper,no_rbam`) for Table V column B (RBAM removed).
The phase lengths are `config.phases`; their sum must be `num_epochs`, e.g.
  --config.phases="(('reconstruct', 10), ('repair', 5))" --config.num_epochs=15
"""

import ml_collections

from configs import common

PHASE_EPOCHS = {'': (12, 8), 'paper': (400, 200)}  # (reconstruct, repair) epochs per variant.


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant, flags = common.parse_arg(arg, 'rbae', variants=('paper',), flags=('no_rbam',))
  c = common.get_config()
  c.model.name = 'rbae'
  c.dataset.categories = 'weave,marble'  # The embedded dataset's textures (RB-AE is a texture model).
  c.dataset.image_size = 64
  c.dataset.unified = False  # One model per category, as in the paper.
  c.batch_size = 8
  c.eval_batch_size = 16
  c.optimizer.learning_rate = 1e-3
  c.optimizer.kwargs = ml_collections.ConfigDict({'weight_decay': 1e-5})
  c.image_score = 'max_zscore'  # The paper does not say how it scores images (see the model doc).

  c.phases = tuple(zip(('reconstruct', 'repair'), PHASE_EPOCHS[variant]))
  c.num_epochs = sum(PHASE_EPOCHS[variant])

  c.defects.enabled = True  # Eq. 1: artificial defects on the training examples.

  c.backbone.arch = 'vgg16'  # Frozen ImageNet VGG16 of the perceptual loss (Eq. 13, 16).
  c.backbone.features = (0, 1, 2, 3, 4)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (stage ends).

  c.rbae = r = ml_collections.ConfigDict()
  r.channels = (16, 32, 64, 128, 128)  # Widths of the five encoder layers (not given in the paper).
  r.strides = (1, 2, 2, 2, 1)  # Their strides; the RBAM layers' maps must divide by patch_sizes.
  r.rbam_layers = (3, 4, 5)  # l1..l2 of Eq. 9 (1-based): RBAMs on the three deepest layers.
  r.patch_sizes = (2, 4)  # K of the two RBFRMs (F_rep2, F_rep4).
  r.similarity_scale = 1.0  # Softmax over scale * cosine (Eq. 4: 1).
  r.ffm_width = 64  # FFM compression channels (Sec. III-C2: 64).
  r.ffm_kernel = 5  # FFM conv kernel m (Sec. III-C2: 5, larger than the largest K).
  r.use_rbam = True  # Table V column B: False replaces the RBAMs by the identity.
  r.head_width = 32  # Width of each MSFDM head (not given in the paper).
  r.map_weights = (0.2, 0.2, 0.6)  # lambda_1..3 of Eq. 11.
  r.focal_gamma = 2.0  # Focal loss gamma (Eq. 10; the paper gives none, 2 is the usual).
  # The five VGG16 ReLU maps of the perceptual loss (Eq. 13, 16; Sec. III-E: "the first five feature maps
  # from the ReLU activation layers"): 'stage_ends' (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, the
  # backbone's maps) or 'first' (relu1_1, relu1_2, relu2_1, relu2_2, relu3_1, the words taken literally).
  r.perceptual_layers = 'stage_ends'
  # True: L_seg (Eq. 10) reaches only the MSFDM, the reconstruction it re-encodes is a constant; False: it
  # also trains the decoder and RBAM through the reconstruction (the paper does not say).
  r.stop_segmentation_gradient = False
  r.w_rec1 = 100.0  # Eq. 14 weights.
  r.w_per1 = 1.0
  r.w_pixel_dis1 = 1.0
  r.w_rec2 = 100.0  # Eq. 17 weights.
  r.w_per2 = 1.0
  r.w_fea_rep2 = 1.0
  r.w_seg2 = 1.0
  r.reference = 'medoid'  # 'medoid' (training image nearest the mean image) or 'index'.
  r.reference_index = 0  # Training image used when reference='index'.
  r.score = 'msfdm'  # Map: 'msfdm' (Eq. 11) or 'residual' (channel mean |I - I_rec|, not in the paper).
  r.smoothing_sigma = 2.0  # Gaussian sigma (pixels) of the final map; image score = its max.
  # The offline VGG16 is the Caffe/Keras one (inputs 0-255 minus the mean); the paper's torchvision VGG16
  # takes inputs / std (std ~ 0.226 * 255 = 57.6), so its maps are ~57.6x smaller. Dividing by this keeps
  # Eq. 14/17's 100 : 1 balance of L_rec and L_per; 1 uses the raw maps.
  r.vgg_feature_scale = 57.6

  if variant == 'paper':
    c.dataset.name = 'folder'
    c.dataset.root = ''  # The MVTec AD root.
    c.dataset.categories = 'carpet,grid,leather,tile,wood'
    c.dataset.image_size = 256
    c.log_every = 50
    # Sec. IV-A2: "the Adam optimizer with a learning rate of 0.0001 and a weight decay of 0.00001", as
    # torch.optim.Adam's weight_decay: L2 on the gradient (coupled), not AdamW.
    c.optimizer.name = 'adam'
    c.optimizer.learning_rate = 1e-4
    c.optimizer.kwargs = ml_collections.ConfigDict()
    c.optimizer.l2_weight_decay = 1e-5
    # Eq. 1 "generated in a similar way to DRAEM" with I_n "from ImageNet": DRAEM's masks (Perlin noise >
    # 0.5, lattice 2^0..2^5), half the samples left defect-free, fills from an image folder.
    c.defects.mask = 'threshold'
    c.defects.threshold = 0.5
    c.defects.perlin_scales = (0, 5)
    c.defects.clean_fraction = 0.5
    c.defects.fill = 'folder'
    c.defects.fill_root = ''  # A folder of natural images (ImageNet in the paper, DTD in DRAEM).
    r.perceptual_layers = 'first'
    c.image_score = 'model'  # The map's maximum.
    r.channels = (32, 64, 128, 256, 256)
    r.strides = (1, 2, 2, 2, 2)
    r.head_width = 64
    r.smoothing_sigma = 4.0
  if 'no_rbam' in flags:
    r.use_rbam = False
  return c
