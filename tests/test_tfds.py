"""dataset.name='tfds': the prepared ArrayRecord data gives the folder path's pixels, batches and results."""

import json
import os
import sys

import numpy as np
from conftest import tiny_folder_config

from jaxad import train
from jaxad.data import folder, pipeline, tfds_mvtec


def _config(root, name, tfds_dir, **overrides):
  from configs import mean_image

  c = tiny_folder_config(mean_image.get_config(), root)
  c.dataset.name = name
  c.dataset.unified = True  # One run over both categories: heatmaps/<category>/ in one workdir.
  c.dataset.tfds_dir = str(tfds_dir)
  c.dataset.image_size = 32
  c.batch_size = 4
  c.eval_batch_size = 10
  c.num_epochs = 2
  c.num_heatmaps = 2
  c.augment.hflip = True  # Per-example random flips: both paths must draw the same ones.
  for k, v in overrides.items():
    c.dataset[k] = v
  return c


def test_prepared_records_equal_the_folder_pixels_and_batches(tiny_dataset, tmp_path):
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags.
  ref, tf = _config(tiny_dataset, 'folder', tmp_path), _config(tiny_dataset, 'tfds', tmp_path)
  categories = pipeline.categories(tf, pipeline.dataset_root(tf))
  builder = pipeline._prepared(tf)
  assert os.path.isdir(builder.data_dir) and builder.info.splits['weave_train'].num_examples == 12
  assert any(f.endswith('.array_record-00000-of-00001') for f in os.listdir(builder.data_dir))
  assert categories == folder.list_categories(tiny_dataset)
  for c in categories:
    for split in ('train', 'test'):
      samples = pipeline.scan(tf, tiny_dataset, c, split)
      expected = pipeline.scan(ref, tiny_dataset, c, split)
      assert [(os.path.join(tiny_dataset, s.image_path), s.defect_type, s.label) for s in samples] == [
        (s.image_path, s.defect_type, s.label) for s in expected
      ]
      got, want = pipeline.image_source(tf, samples), pipeline.image_source(ref, expected)
      for i in range(len(want)):
        a, b = got[i], want[i]
        assert a.keys() == b.keys()
        for k in a:  # Same decoded pixels, bit for bit, and same dtypes.
          assert a[k].dtype == b[k].dtype, k
          np.testing.assert_array_equal(a[k], b[k], err_msg=f'{c}/{split}/{i}/{k}')

  samples = [s for c in categories for s in pipeline.scan(tf, tiny_dataset, c, 'train')]
  expected = [s for c in categories for s in pipeline.scan(ref, tiny_dataset, c, 'train')]
  iters = [
    pipeline.train_iterator(pipeline.image_source(tf, samples), tf, process_index=0, process_count=1),
    pipeline.train_iterator(pipeline.image_source(ref, expected), ref, process_index=0, process_count=1),
  ]
  tf.dataset.num_workers = 2  # Records reopened inside grain worker processes.
  iters.append(
    pipeline.train_iterator(pipeline.image_source(tf, samples), tf, process_index=0, process_count=1)
  )
  for _ in range(6):
    a, b, w = (next(it) for it in iters)
    for k in b:
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(w[k], b[k])
  assert 'tensorflow' not in sys.modules


def test_training_run_from_prepared_data_equals_the_folder_run(tiny_dataset, tmp_path):
  results = {}
  for name in ('folder', 'tfds'):
    config = _config(tiny_dataset, name, tmp_path / 'tfds')
    results[name] = train.train_and_evaluate(config, str(tmp_path / name))
  assert results['tfds'] == results['folder']  # Exactly: same pixels, same batches, same state.
  written = {n: json.loads((tmp_path / n / 'metrics.json').read_text()) for n in ('tfds', 'folder')}
  for key in ('model', 'categories', 'mean'):  # The provenance differs: TFDS records have no file sizes.
    assert written['tfds'][key] == written['folder'][key]
  for c in results['folder']:
    assert sorted(os.listdir(tmp_path / 'tfds' / 'heatmaps' / c)) == sorted(
      os.listdir(tmp_path / 'folder' / 'heatmaps' / c)
    )


def test_prepared_data_is_used_without_the_folder(tiny_dataset, tmp_path):
  import shutil

  root = tmp_path / 'copy'
  shutil.copytree(tiny_dataset, root)
  config = _config(str(root), 'tfds', tmp_path / 'tfds')
  builder = pipeline._prepared(config)
  shutil.rmtree(root)  # Runs on prepared data need only the records (and the tag, here root's name).
  assert tfds_mvtec.categories(builder) == ['marble', 'weave']
  source = pipeline.image_source(config, pipeline.scan(config, str(root), 'weave', 'test'))
  assert len(source) == 10 and source[9]['label'] == 1 and source[9]['mask'].any()
