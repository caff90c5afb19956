"""Entry point: python -m jaxad.main --config configs/sivt.py[:variant] --workdir DIR [--config.x=y].

Re-running with the same workdir resumes from the latest checkpoint. A run stopped by SIGTERM/SIGINT
saves a checkpoint and exits with jaxad.PREEMPTED_EXIT_CODE (75). Compiled programs are kept in JAX's
persistent compilation cache, so a rerun, a resume or another seed loads them instead of compiling
them again.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

import jaxad

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Model config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0 for multi-process runs; TPU pods and Slurm are detected without it.',
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (multi-process).')
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed',
  False,
  'Call jax.distributed.initialize() and let JAX detect the cluster (TPU pod '
  'slices, Slurm, ...) where the environment alone does not show it (e.g. over ssh on a TPU VM).',
)
_COMPILATION_CACHE = flags.DEFINE_string(
  'compilation_cache_dir',
  None,
  'JAX persistent compilation cache. Default: '
  '$JAX_COMPILATION_CACHE_DIR if set, else <$JAXAD_CACHE or ~/.cache/jaxad>/xla; "none": off.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def _wants_distributed() -> bool:
  return bool(
    _DISTRIBUTED.value
    or _COORDINATOR.value
    or 'SLURM_JOB_ID' in os.environ
    and int(os.environ.get('SLURM_NTASKS', '1')) > 1
    or 'TPU_WORKER_HOSTNAMES' in os.environ
  )


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax/grain INFO chatter (dozens of lines per checkpoint) out of the log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
      f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'array_record')
    )


def _enable_compilation_cache(jax) -> None:
  """Points JAX's persistent compilation cache at the flag's folder (after distributed init, which
  decides which process writes, and before the first compilation)."""
  path = _COMPILATION_CACHE.value
  if path is None:
    path = jax.config.jax_compilation_cache_dir or os.path.join(jaxad.cache_root(), 'xla')
  if path.lower() == 'none':
    jax.config.update('jax_enable_compilation_cache', False)
    return
  jax.config.update('jax_compilation_cache_dir', path)
  logging.info('Persistent compilation cache: %s', path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax

  jax.config.update('jax_threefry_partitionable', True)
  if _wants_distributed():
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  _enable_compilation_cache(jax)
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(), jax.devices())
  return run(_CONFIG.value, _WORKDIR.value)


def run(config, workdir: str) -> int:
  """Trains and evaluates; the process exit code: 0, or PREEMPTED_EXIT_CODE after a clean stop."""
  from jaxad import train

  try:
    train.train_and_evaluate(config, workdir)
  except train.Preempted as e:
    logging.warning('Stopped cleanly: %s', e)
    return jaxad.PREEMPTED_EXIT_CODE  # "Requeue me": jaxad.sweep and the launch scripts rerun it.
  return 0


if __name__ == '__main__':
  app.run(main)
