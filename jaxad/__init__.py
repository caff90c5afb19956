"""jaxad: industrial visual anomaly detection in JAX/Flax."""

import os

__version__ = '0.1.0'

# Exit code of a run stopped by SIGTERM/SIGINT after saving its checkpoint (EX_TEMPFAIL): rerun to resume.
PREEMPTED_EXIT_CODE = 75


def cache_root() -> str:
  """Where jaxad keeps generated data and compiled programs: $JAXAD_CACHE or ~/.cache/jaxad."""
  return os.environ.get('JAXAD_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'jaxad')


def load(workdir: str):
  """The trained, calibrated detector a `python -m jaxad.main` run left in `workdir` (jaxad.detector)."""
  from jaxad import detector

  return detector.load(workdir)
