"""Does RB-AE's RBAM repair defective features? Measured on a trained run's checkpoints, per RBAM layer.

    python benchmarks/rbae_repair.py --config configs/rbae.py --workdir runs/rbae --category weave \
        [--scales 1,10,30,100] [--num_images 48] [--config.rbae.similarity_scale=...]

Artificial defects (Eq. 1, the run's own `config.defects` and seed, but on every image: no
`clean_fraction`) are put on training images of the category. With the latest checkpoint's encoder
(phase 2 keeps phase 1's encoder; the run must have finished phase 1), F_o = Phi(I_o), F_d = Phi(I_ad)
and F_ref = Phi(reference image) are computed. For each RBAM layer it prints the RMS (over channels)
distance to F_o, averaged inside the defect mask and outside it, of
  F_d                     (no repair: what the decoder gets without RBAM),
  RBFRM(F_d; K, scale)    (Eq. 3-5; Eq. 4 is scale 1) for K in rbae.patch_sizes and each --scales,
and, when the checkpoint is in phase 2, the mean FFM weights (Eq. 7) of F_d, F_rep2, F_rep4 inside and
outside the masks and the difference of the repaired branches' total weight (inside - outside). A useful
RBAM needs RBFRM below F_d inside the defects and FFM weights that move towards the repaired branches
there (a positive difference). Config overrides must match the run's.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import (
  app,  # noqa: E402
  flags,  # noqa: E402
)
from ml_collections import config_flags  # noqa: E402

from jaxad import models, train  # noqa: E402
from jaxad.data import defects, pipeline  # noqa: E402
from jaxad.models import rbae  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/rbae.py', "The run's config.", lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, "The run's --workdir.", required=True)
_CATEGORY = flags.DEFINE_string('category', None, 'Category (per-category runs: a subfolder).', required=True)
_SCALES = flags.DEFINE_list('scales', ['1', '10', '30', '100'], 'Softmax scales of RBFRM to try.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 48, 'Training images given artificial defects.')


def load_state(checkpoints: str, step: int) -> dict:
  """RB-AE's model state {'params', 'opt', 'reference'} at `step`, read-only."""
  return ocp.StandardCheckpointer().restore(os.path.join(checkpoints, str(step), 'state'))['model']


def inside_outside(distance: np.ndarray, mask: np.ndarray) -> str:
  """'inside / outside' means; '-' inside when no map cell is mostly covered by a defect."""
  inside = f'{distance[mask].mean():.3f}' if mask.any() else '-'
  return f'{inside} / {distance[~mask].mean():.3f}'


def main(argv):
  del argv
  config = _CONFIG.value
  samples = pipeline.scan(config, pipeline.dataset_root(config), _CATEGORY.value, 'train')
  checkpoints = os.path.join(_WORKDIR.value, '' if config.dataset.unified else _CATEGORY.value, 'checkpoints')
  latest = max((int(s) for s in os.listdir(checkpoints) if s.isdigit()), default=None)
  (_, phase1_end), *_ = train.phase_schedule(config, len(samples))
  if latest is None or latest < phase1_end:
    raise FileNotFoundError(
      f'{checkpoints} has no checkpoint at or after the end of phase 1 (step {phase1_end}; latest: {latest}).'
    )
  state = load_state(checkpoints, latest)  # Phase 2 leaves the encoder as phase 1 ended.
  context = models.ModelContext(
    image_size=config.dataset.image_size,
    channels=config.dataset.channels,
    dtype=models.compute_dtype(config.dtype),
    attention_implementation=config.attention_implementation,
    total_steps=0,
    phase_steps={},
    optimizer_config=config.optimizer,
  )
  net = rbae.network(config.rbae, context)
  source = pipeline.image_source(config, samples)
  every_image = config.copy_and_resolve_references()
  every_image.defects.clean_fraction = 0.0
  synthesize = defects.synthesizer(every_image, source)
  rng = np.random.default_rng(config.seed)
  examples = [synthesize(source[i], rng) for i in range(min(_NUM_IMAGES.value, len(source)))]
  stack = lambda key: jnp.stack([e[key] for e in examples])
  encode = lambda x: net.apply({'params': state['params']}, x, method=rbae.RBAE.encode)
  f_o, f_d, f_ref = encode(stack('image')), encode(stack('defect_image')), encode(state['reference'])
  ffm_attention = None
  if latest > phase1_end and config.rbae.use_rbam:  # The model's own phase-2 forward, FFM outputs kept.
    _, captured = net.apply(
      {'params': state['params']},
      stack('defect_image'),
      state['reference'],
      capture_intermediates=lambda module, _: isinstance(module, rbae.FFM),
      mutable=['intermediates'],
    )
    ffm_attention = [
      captured['intermediates'][f'rbams_{i}']['ffm']['__call__'][0][1]
      for i in range(len(config.rbae.rbam_layers))
    ]
  print(
    f'{_CATEGORY.value}: distance to F_o, inside / outside the defects ({len(examples)} images; '
    f'step {latest})'
  )
  for index, layer in enumerate(config.rbae.rbam_layers):
    l = layer - 1
    mask = np.asarray(rbae.resize_mask(stack('defect_mask'), f_o[l].shape[1:3]) > 0.5)
    distance = lambda f: np.sqrt(np.mean(np.square(np.asarray(f - f_o[l])), -1))
    print(
      f'layer {layer} {f_o[l].shape[1]}x{f_o[l].shape[2]} ({int(mask.sum())} cells inside), |F_o| '
      f'{np.sqrt(np.mean(np.square(np.asarray(f_o[l])), -1)).mean():.3f}: '
      f'F_d {inside_outside(distance(f_d[l]), mask)}'
    )
    for k in config.rbae.patch_sizes:
      print(
        f'  RBFRM K={k}: '
        + ', '.join(
          f'scale {s} {inside_outside(distance(rbae.rbfrm(f_d[l], f_ref[l], k, float(s))), mask)}'
          for s in _SCALES.value
        )
      )
    if ffm_attention is not None and mask.any():
      weights = np.asarray(ffm_attention[index].mean(-1))
      inside, outside = weights[:, mask].mean(1), weights[:, ~mask].mean(1)
      print(
        f'  FFM weights (F_d, F_rep{config.rbae.patch_sizes[0]}, F_rep{config.rbae.patch_sizes[1]}) '
        f'(scale {config.rbae.similarity_scale:g}): inside {np.round(inside, 3)}, outside '
        f'{np.round(outside, 3)}; repaired weight inside - outside '
        f'{inside[1:].sum() - outside[1:].sum():+.3f}'
      )


if __name__ == '__main__':
  app.run(main)
