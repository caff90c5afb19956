"""Exports a trained, calibrated detector as one function, with a parity check (docs/deploy.md).

  python -m jaxad.export --workdir W --category C --format stablehlo|onnx --out F [--parity_images N]

The exported function takes uint8 images [B, S, S, C] (B any batch size, S and C those of training;
decode and resize are the deployment's, everything after is inside): it divides by 255, runs the
model, the image-score normalisation, the threshold and the mask, and returns, in this order,
anomalous [B] (bool), map [B, S, S], mask [B, S, S] (bool), normalised_score [B], score [B].
`stablehlo` is a `jax.export` artifact for CPU, CUDA and TPU that `jax.export.deserialize` loads with
jax alone; `onnx` is converted by jax2onnx. Every export scores test images of the run with the
artifact and with the jitted checkpoint and writes `<F>.parity.json`; it fails when a score or map
differs by more than 1e-4 relative to the largest magnitude of that output (at least 1): an absolute
1e-4 would be below float32's resolution for maps whose values reach the thousands (SIVT's). Outputs
that divide the model's map by per-pixel standard deviations, or by the normalising span, get the
allowance that division gives the map's (`allowances`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxad import calibration, writers
from jaxad.data import pipeline

OUTPUTS = ('anomalous', 'map', 'mask', 'normalised_score', 'score')  # Sorted keys: the flattened order.
TOLERANCE = 1e-4
# Model config switches that run layers as nn.scan, which jax2onnx cannot convert with a symbolic batch.
SCAN_SWITCHES = ('scan_blocks', 'scan_scales')


class ParityError(AssertionError):
  """The artifact's scores or maps differ from the checkpoint's by more than TOLERANCE."""


def uint8_function(detector, category: str):
  """detector.function(category) on uint8 images [B, S, S, C]."""
  detect = detector.function(category)
  return lambda images: detect(images.astype(jnp.float32) / 255.0)


def _spec(detector):
  shape = jax.export.symbolic_shape(f'b, {detector.image_size}, {detector.image_size}, {detector.channels}')
  return jax.ShapeDtypeStruct(shape, jnp.uint8)


def export_stablehlo(detector, category: str, path: str):
  """Writes the serialized jax.export artifact; returns a callable of it (uint8 images -> OUTPUTS)."""
  exported = jax.export.export(jax.jit(uint8_function(detector, category)), platforms=('cpu', 'cuda', 'tpu'))(
    _spec(detector)
  )
  writers.atomic_write_bytes(path, bytes(exported.serialize()))
  with open(path, 'rb') as f:
    loaded = jax.export.deserialize(bytearray(f.read()))
  return lambda images: [np.asarray(loaded.call(images)[k]) for k in OUTPUTS]


def export_onnx(detector, category: str, path: str):
  """Writes the jax2onnx conversion; returns an onnxruntime callable of it (uint8 images -> OUTPUTS)."""
  try:
    from jax2onnx import to_onnx
  except ImportError as e:
    raise RuntimeError(
      'ONNX export needs jax2onnx, which is not installed with jaxad: its releases pin '
      'orbax-checkpoint<0.11.37 while jaxad reads its checkpoints with orbax-checkpoint>=0.12. Install '
      'it without its pins (`pip install onnx-ir onnxruntime && pip install --no-deps jax2onnx==0.17.1`) or '
      'use --format=stablehlo.'
    ) from e
  import onnxruntime

  name = detector.config.model.name
  for switch in SCAN_SWITCHES:
    if detector.config[name].get(switch, False):
      raise RuntimeError(
        f'jax2onnx cannot convert scanned layers (nn.scan) with a symbolic batch, and this run was '
        f'trained with {name}.{switch}=True: export it with --format=stablehlo, or train it with '
        f'--config.{name}.{switch}=False for ONNX.'
      )
  try:
    model = to_onnx(uint8_function(detector, category), [_spec(detector)])
  except Exception as e:  # The converter raises many types for primitives it does not handle.
    raise RuntimeError(
      f'jax2onnx cannot convert the {detector.config.model.name} detector: {type(e).__name__}: '
      f'{str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}'
    ) from e
  writers.atomic_write_bytes(path, model.SerializeToString())
  session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
  name = session.get_inputs()[0].name
  return lambda images: session.run(None, {name: np.asarray(images, np.uint8)})


def parity_images(detector, category: str, count: int) -> np.ndarray:
  """Up to `count` test images of the run's category, as uint8 [N, S, S, C] (what the artifact takes)."""
  config = calibration.load_config_record(detector.workdir)
  samples = pipeline.scan(config, pipeline.dataset_root(config), category, 'test')
  picked = [
    samples[i] for i in np.linspace(0, len(samples) - 1, min(count, len(samples))).round().astype(int)
  ]
  images = detector.load_images([s.image_path for s in picked])
  return np.round(images * 255.0).astype(np.uint8)


def magnitude(x) -> float:
  """An output's largest absolute value, at least 1: what TOLERANCE is relative to."""
  return max(1.0, float(np.max(np.abs(x))))


def allowances(calib: calibration.Calibration, reference: dict) -> dict[str, float]:
  """The largest |artifact - checkpoint| accepted for each compared output of `reference`.

  TOLERANCE times the output's largest magnitude (at least 1). An output that divides the model's map
  by the per-pixel standard deviations of `max_zscore` or `deviation` (jaxad.calibration) may differ
  by the map's allowance divided by the smallest of them, since the division magnifies the last bits
  that another runtime's kernels round differently just as much; the normalised score by the score's
  allowance divided by the normalising span.
  """
  allowed = {k: TOLERANCE * magnitude(reference[k]) for k in ('score', 'normalised_score', 'map')}
  if calib.zscore_std is not None:
    std = np.asarray(calib.zscore_std, np.float64)
    model_map = np.asarray(reference['map'], np.float64)
    if calib.anomaly_map == 'deviation':  # |map - mean| / std: the map is within mean +- this * std.
      model_map = np.abs(calib.zscore_mean) + model_map * std
    divided = TOLERANCE * magnitude(model_map) / float(np.min(std))
    if calib.image_score == 'max_zscore':
      allowed['score'] = max(allowed['score'], divided)
    if calib.anomaly_map == 'deviation':
      allowed['map'] = max(allowed['map'], divided)
  allowed['normalised_score'] = max(allowed['normalised_score'], allowed['score'] / calib.normalising_span)
  return allowed


def parity(detector, category: str, artifact, images: np.ndarray, path: str, fmt: str) -> dict:
  """Compares the artifact with the jitted detector on `images`; writes `<path>.parity.json`."""
  reference = jax.device_get(jax.jit(uint8_function(detector, category))(images))
  got = dict(zip(OUTPUTS, artifact(images)))
  allowed = allowances(detector.calibrations[category], reference)
  diff, scale = {}, {}
  for k in ('score', 'normalised_score', 'map'):
    want = np.asarray(reference[k], np.float64)
    diff[k] = float(np.max(np.abs(np.asarray(got[k], np.float64) - want)))
    scale[k] = magnitude(want)
  agree = {k: float(np.mean(np.asarray(got[k]) == np.asarray(reference[k]))) for k in ('anomalous', 'mask')}
  report = {
    'format': fmt,
    'model': detector.config.model.name,
    'category': category,
    'images': int(len(images)),
    'platform': jax.devices()[0].platform,
    'max_abs_diff': diff,
    'max_rel_diff': {k: diff[k] / scale[k] for k in diff},
    'agreement': agree,
    'tolerance': TOLERANCE,
    'allowed_abs_diff': allowed,
    'passed': all(diff[k] <= allowed[k] for k in diff),
  }
  writers.atomic_write_json(path + '.parity.json', report)
  if not report['passed']:
    raise ParityError(f'{path}: the artifact differs from the checkpoint by {diff} (allowed {allowed}).')
  return report


def export(detector, category: str | None, fmt: str, path: str, count: int = 16) -> dict:
  """Exports `category`'s detector to `path` in `fmt` and checks parity; returns the parity report."""
  category = detector._category(category)
  write = {'stablehlo': export_stablehlo, 'onnx': export_onnx}[fmt]
  artifact = write(detector, category, path)
  return parity(detector, category, artifact, parity_images(detector, category, count), path, fmt)


def _define_flags():
  """The command-line flags (defined only when this module runs as a program)."""
  flags.DEFINE_string('workdir', None, 'A finished run of python -m jaxad.main.')
  flags.DEFINE_string('category', None, 'Category to export (needed for several).')
  flags.DEFINE_enum('format', 'stablehlo', ['stablehlo', 'onnx'], 'Artifact format.')
  flags.DEFINE_string('out', None, 'Artifact path.')
  flags.DEFINE_integer('parity_images', 16, 'Test images scored for the parity check.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jaxad

  report = export(
    jaxad.load(flags.FLAGS.workdir),
    flags.FLAGS.category,
    flags.FLAGS.format,
    flags.FLAGS.out,
    flags.FLAGS.parity_images,
  )
  print(
    f'{flags.FLAGS.out}: parity on {report["images"]} images, largest differences {report["max_abs_diff"]}'
  )


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
