"""ViT-Mem-CA at the scale of tests/test_vit_memae.py's short-training test, over categories and seeds.

  python benchmarks/vit_memae_short.py --set vit_memae.l2_channels=mean

The settings of `test_short_training_beats_chance_by_a_wide_margin`: embedded categories generated at
64x64 (40 train, 8 good + 12 defect test images each), P=8, a 2-block width-64 ViT, 100 steps. One JSON
line per (seed, category): image AUROC, pixel AUROC and AUPRO in percent. A minute or two per line
on a 2-core CPU: a quick comparison of architecture and loss settings, not a result of the default.
"""

import ast
import json
import os
import sys
import tempfile

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, 'tests'))
from jaxad import metrics  # noqa: E402
from jaxad.data import synthetic  # noqa: E402

_CATEGORIES = flags.DEFINE_list('categories', ['weave', 'ring_seal'], 'Embedded categories.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Training seeds.')
_SET = flags.DEFINE_multi_string('set', [], 'Config override key=value (Python literal or string).')


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv):
  del argv
  import test_vit_memae as t  # The test's config helpers: the measured settings are the test's.

  overrides = {k: _value(v) for k, v in (s.split('=', 1) for s in _SET.value)}
  with tempfile.TemporaryDirectory() as tmp:
    root = synthetic.generate(
      os.path.join(tmp, 'data'),
      seed=0,
      image_size=64,
      num_train=40,
      num_test_good=8,
      num_test_defect=12,
      categories=tuple(_CATEGORIES.value),
      progress=False,
    )
    for seed in map(int, _SEEDS.value):
      for category in _CATEGORIES.value:
        config = t._small_net_config(root, epochs=20, seed=seed, **overrides)
        model, state, _ = t._train(config, os.path.join(tmp, f'run_{seed}_{category}'), [category])
        scored = t._score(config, model, state, category)
        r = metrics.compute_all(scored['scores'], scored['labels'], scored['maps'], scored['masks'])
        row = {'seed': seed, 'category': category, **overrides}
        row.update({k: round(100 * float(r[k]), 1) for k in ('image_auroc', 'pixel_auroc', 'aupro')})
        print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
