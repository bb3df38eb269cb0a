"""Shardings of the batch and the train state; feeding process-local data.

* Batch: leading (batch) axis split over 'data', replicated over 'model'.
* State: replicated, except, when the mesh has a 'model' axis > 1, arrays of
  at least ``min_shard_size`` elements get their largest axis that the model
  axis divides split over 'model' (a simple, deterministic rule: Adam moments
  have the shapes of their params, so they get the same sharding).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddq_jax.parallel.mesh import DATA, MODEL

MIN_SHARD_SIZE = 2 ** 14


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def leaf_spec(shape, model_size: int, *, min_size: int = MIN_SHARD_SIZE) -> P:
  """PartitionSpec of one array under the 'largest divisible axis' rule."""
  if model_size <= 1 or len(shape) < 2 or int(np.prod(shape)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: (-shape[i], -i))
  for axis in order:
    if shape[axis] % model_size == 0:
      spec = [None] * len(shape)
      spec[axis] = MODEL
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, *,
                   min_size: int = MIN_SHARD_SIZE) -> Any:
  """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
  model_size = int(mesh.shape[MODEL])
  return jax.tree.map(
      lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), model_size,
                                              min_size=min_size)), tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded on 'data'.

  Each process passes only its own rows (``global_batch / process_count``);
  the global batch is their concatenation in process order.  On one process
  this is a plain device_put split over the data axis.
  """
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree.map(put, batch)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Rows each process feeds; checks the data axis divides the batch."""
  data = int(mesh.shape[DATA])
  if global_batch_size % data or global_batch_size % jax.process_count():
    raise ValueError(f'global batch {global_batch_size} not divisible by data '
                     f'axis {data} / {jax.process_count()} processes')
  return global_batch_size // jax.process_count()


def to_host(tree: Any) -> Any:
  """Fully-replicated (or fully addressable) arrays -> numpy on every host."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)
