"""What a run was made from: the resolved config, the software and devices, and the training data.

A workdir keeps `config.json` (written when training starts); metrics.json carries the provenance of
the evaluation. A rerun on the same workdir whose training-relevant config or training data differ
from the recorded ones is refused (`check_rerun`), because it would resume or re-evaluate a model that
was trained on something else.
"""

import hashlib
import importlib
import json
import os
import platform
import subprocess

import jax
import ml_collections

import jaxad

# Fields that only change how a trained model is evaluated or how a run is operated: they may differ
# on a rerun. A model module can add its own scoring fields as `SCORING_FIELDS` (names in its block).
EVALUATION_FIELDS = (
  'image_score',
  'anomaly_map',
  'num_heatmaps',
  'eval_batch_size',
  'eval_every_epochs',
  'log_every',
  'checkpoint_every',
  'keep_checkpoints',
  'allow_config_change',
  'dataset.num_workers',
  'dataset.prefetch',
  'dataset.tfds_dir',
  'calibration.rule',
  'calibration.false_positive_rate',
  'calibration.pixel_rule',
  'calibration.pixel_false_positive_rate',
  'calibration.labelled_root',
  'calibration.manual_threshold',
  'calibration.manual_pixel_threshold',
)

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'numpy')


class ConfigMismatch(ValueError):
  """The workdir holds a run trained with another config or on other data."""


def flat_config(config: ml_collections.ConfigDict) -> dict:
  """{'dotted.name': JSON-safe value} of every config field."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        walk(value, f'{prefix}{key}.')
      else:
        out[f'{prefix}{key}'] = json.loads(json.dumps(value, default=str))

  walk(config, '')
  return out


def scoring_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """EVALUATION_FIELDS plus the model's own scoring fields (`<model>.<field>`)."""
  name = config.model.name
  try:
    module = importlib.import_module(f'jaxad.models.{name}')
  except ImportError:
    return EVALUATION_FIELDS
  return EVALUATION_FIELDS + tuple(f'{name}.{f}' for f in getattr(module, 'SCORING_FIELDS', ()))


# Config fields added after runs were first recorded, each with the value that reproduces a run
# recorded without it: such a record reads as having that value (a rerun, jaxad.load). A model module
# lists its own as `ADDED_FIELDS`, and those that change its parameter layout as `LAYOUT_FIELDS`.
ADDED_FIELDS = {
  'num_seeds': 1,
  'optimizer.l2_weight_decay': 0.0,
  'defects.mask': 'coverage',
  'defects.threshold': 0.5,
  'defects.clean_fraction': 0.0,
  'defects.opacity': [1.0, 1.0],  # As config.json holds it (JSON has no tuples).
  'anomaly_map': 'model',
  'augment.rot90': False,
}


def _model_fields(name: str, attribute: str) -> dict:
  try:
    module = importlib.import_module(f'jaxad.models.{name}')
  except ImportError:
    return {}
  return {f'{name}.{f}': v for f, v in getattr(module, attribute, {}).items()}


def layout_fields(config: ml_collections.ConfigDict) -> dict:
  """{'<model>.<field>': value a record without the field implies} of the model's `LAYOUT_FIELDS`:
  fields that change the parameter layout of its checkpoints (e.g. `scan_blocks`)."""
  return _model_fields(config.model.name, 'LAYOUT_FIELDS')


def implied_fields(model_name: str) -> dict:
  """{flat field: value} that a record without the field implies: `ADDED_FIELDS` and the model's
  `ADDED_FIELDS` and `LAYOUT_FIELDS`."""
  return {
    **ADDED_FIELDS,
    **_model_fields(model_name, 'ADDED_FIELDS'),
    **_model_fields(model_name, 'LAYOUT_FIELDS'),
  }


def data_fingerprint(samples_by_category: dict) -> dict:
  """Count and digest of the training files: category, file name and size of each.

  Sizes, not modification times: a copied or regenerated dataset with the same files matches.
  """
  digest = hashlib.sha256()
  count = 0
  for category in sorted(samples_by_category):
    for s in sorted(samples_by_category[category], key=lambda s: s.image_path):
      try:
        stamp = str(os.stat(s.image_path).st_size)
      except OSError:  # Prepared TFDS records have no file per image.
        stamp = ''
      digest.update(f'{category}/{os.path.basename(s.image_path)}:{stamp}\n'.encode())
      count += 1
  return {'train_images': count, 'train_sha256': digest.hexdigest()}


def _git_commit() -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(jaxad.__file__)))
  if not os.path.isdir(os.path.join(root, '.git')) and not os.path.isfile(os.path.join(root, '.git')):
    return None
  try:
    out = subprocess.run(
      ['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def environment() -> dict:
  """Software versions, git commit, devices, processes and XLA flags of this process."""
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.import_module(name).__version__
    except (ImportError, AttributeError):
      versions[name] = None
  device = jax.devices()[0]
  return {
    'jaxad_version': jaxad.__version__,
    'git_commit': _git_commit(),
    'versions': versions,
    'python': platform.python_version(),
    'device_kind': device.device_kind,
    'platform': device.platform,
    'device_count': jax.device_count(),
    'process_count': jax.process_count(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def record(config: ml_collections.ConfigDict, train_by_category: dict) -> dict:
  """The run record kept in `<workdir>/config.json`."""
  return {
    'config': flat_config(config),
    'seed': config.seed,
    'data': data_fingerprint(train_by_category),
    'environment': environment(),
  }


def differences(recorded: dict, current: dict, ignored: tuple[str, ...]) -> dict:
  """{field: (recorded, current)} of the training-relevant config fields and the data that differ."""
  old, new = recorded.get('config', {}), current['config']
  diff = {
    k: (old.get(k, '<absent>'), new.get(k, '<absent>'))
    for k in sorted(set(old) | set(new))
    if k not in ignored and old.get(k, '<absent>') != new.get(k, '<absent>')
  }
  if recorded.get('data') != current['data']:
    diff['training data'] = (recorded.get('data'), current['data'])
  return diff


def check_rerun(path: str, current: dict, config: ml_collections.ConfigDict) -> dict:
  """Compares the recorded run at `path` (config.json) with `current`; returns the differences.

  Raises ConfigMismatch listing them unless `config.allow_config_change` is set, and always for the
  model's `LAYOUT_FIELDS` (its checkpoints could not be restored). No record: {}.
  """
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigMismatch(
      f'{path} is unreadable ({e}): this workdir cannot be checked against the config. Use a new '
      '--workdir, or remove the file to continue this one.'
    ) from e
  recorded_model = recorded.get('config', {}).get('model.name', config.model.name)
  implied = implied_fields(recorded_model)
  recorded = {**recorded, 'config': {**implied, **recorded.get('config', {})}}
  diff = differences(recorded, current, scoring_fields(config))
  # Another model is a difference like any other; the layout matters for the same model's checkpoints.
  layout = layout_fields(config) if recorded_model == config.model.name else {}
  changed_layout = {k: diff[k] for k in layout if k in diff}
  if changed_layout:
    lines = '\n'.join(f'  {k}: {old!r} -> {new!r}' for k, (old, new) in changed_layout.items())
    flags = ' '.join(f'--config.{k}={old}' for k, (old, _) in changed_layout.items())
    raise ConfigMismatch(
      f'{os.path.dirname(path) or "."} holds checkpoints in another parameter layout:\n{lines}\n'
      f'Pass {flags} to resume or evaluate this run, or use a new --workdir.'
    )
  if diff and not config.allow_config_change:
    lines = '\n'.join(f'  {k}: {old!r} -> {new!r}' for k, (old, new) in diff.items())
    raise ConfigMismatch(
      f'{os.path.dirname(path) or "."} holds a run trained with another config or on other data:\n'
      f'{lines}\nUse a new --workdir for a new run, or pass --config.allow_config_change=True to '
      'continue this one with the new settings.'
    )
  return diff
