"""jaxad: industrial visual anomaly detection in JAX/Flax."""

import os

__version__ = '0.1.0'


def cache_root() -> str:
  """Where jaxad keeps generated data and compiled programs: $JAXAD_CACHE or ~/.cache/jaxad."""
  return os.environ.get('JAXAD_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'jaxad')
