"""Data-parallel sharding: a ('data',) mesh over every device of every process."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxad.data import pipeline


def make_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ('data',))


def batch_sharding(mesh: Mesh, replica_axis: bool = False) -> NamedSharding:
  """Rows over 'data'; with `replica_axis`, batches [K, B, ...] of K replicas, rows (axis 1) over 'data'."""
  return NamedSharding(mesh, P(None, 'data') if replica_axis else P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = 'batch_size') -> int:
  """Returns the per-process batch; the global batch must split evenly over devices."""
  if global_batch % mesh.devices.size:
    raise ValueError(f'{what}={global_batch} is not divisible by the {mesh.devices.size} devices.')
  return global_batch // jax.process_count()


def shard_batch(local_batch: dict, mesh: Mesh, replica_axis: bool = False) -> dict:
  """Global arrays from this process's slice of every global batch (multi-host ready)."""
  sharding = batch_sharding(mesh, replica_axis)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def local_rows(batch: dict, process_index: int, process_count: int) -> dict:
  """This process's contiguous slice of a global batch that every process holds."""
  n = len(next(iter(batch.values()))) // process_count
  return {k: v[process_index * n : (process_index + 1) * n] for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
  """The tree on every device of the mesh; with several processes each passes the same values."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def replicate_key(key: jax.Array, mesh: Mesh) -> jax.Array:
  """A typed PRNG key's raw bits on every device: a jit argument, so new seeds reuse the program."""
  return replicate(jax.random.key_data(key), mesh)


def map_in_order(fn, source, config, mesh):
  """Applies a jitted `fn(batch_of_images) -> outputs` to `source` in order, sharded over devices.

  Yields (host outputs, host batch, number of valid rows); the last batch is padded. Every process
  decodes every batch and feeds its own rows.
  """
  batch_size = config.eval_batch_size
  check_batch_size(batch_size, mesh, 'eval_batch_size')
  for batch, n in pipeline.ordered_batches(source, batch_size, config.dataset.num_workers):
    local = local_rows({'image': batch['image']}, jax.process_index(), jax.process_count())
    yield jax.device_get(fn(shard_batch(local, mesh))), batch, n
