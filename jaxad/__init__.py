"""jaxad: industrial visual anomaly detection in JAX/Flax."""

__version__ = '0.1.0'
