"""Shardings of the batch and of parameter trees; feeding process-local data.

One stack for training, evaluation and the benchmark: the mesh of
``parallel/mesh.py`` (built once from ``config.mesh``) and these rules.

* Batch: leading (batch) axis split over 'data', replicated over 'model'.
* Parameters and optimiser state: partition rules as data
  (``config.mesh.partition_rules``, big_vision style): ``(regex, strategy)``
  pairs matched with ``re.search`` against a leaf's path
  ('params/backbone/layer1_0/conv1/kernel'), first match wins:
    'replicate'     the leaf is copied to every device;
    'largest_axis'  when the mesh's 'model' axis is > 1 and the leaf has at
                    least ``config.mesh.min_shard_size`` elements, its
                    largest axis that the model axis divides is split over
                    'model' (Adam moments have their parameter's shape, so
                    they get the same sharding); else replicated.
    'fsdp'          fully sharded data parallel: a leaf of at least
                    ``min_shard_size`` elements is split on its largest
                    axis that every device of the mesh divides, over
                    ('data', 'model') (else one the 'data' axis divides,
                    over 'data'; else as 'largest_axis').  The parameters,
                    gradients and AdamW moments rest sharded; the step
                    all-gathers the parameters where the per-device loss
                    needs them whole and reduce-scatters the gradient, in
                    place of the replicated layout's all-reduce.  The
                    optimiser then updates per parameter
                    (``optim.flat_update`` is ignored).
  Unmatched leaves are replicated.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from ddq_jax.train.parallel.mesh import DATA, MODEL
from ddq_jax.tree_paths import map_with_paths

MIN_SHARD_SIZE = 2 ** 14
DEFAULT_RULES = (('.*', 'largest_axis'),)
STRATEGIES = ('replicate', 'largest_axis', 'fsdp')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def rules_from_config(config) -> tuple[tuple[tuple[str, str], ...], int]:
  """(partition rules, min shard size) of ``config.mesh`` (config None:
  ``DEFAULT_RULES`` and ``MIN_SHARD_SIZE``)."""
  m = config.mesh if config is not None else None
  rules = tuple(tuple(r) for r in (m.partition_rules if m is not None
                                   else DEFAULT_RULES))
  for r in rules:
    if len(r) != 2 or r[1] not in STRATEGIES:
      raise ValueError(f'mesh.partition_rules entry {r!r}: expected '
                       f'(regex, one of {STRATEGIES})')
  min_size = int(m.min_shard_size) if m is not None else MIN_SHARD_SIZE
  return rules, min_size


def leaf_spec(shape, model_size: int, *, min_size: int = MIN_SHARD_SIZE) -> P:
  """PartitionSpec of one array under the 'largest_axis' strategy."""
  if model_size <= 1 or len(shape) < 2 or int(np.prod(shape)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: (-shape[i], -i))
  for axis in order:
    if shape[axis] % model_size == 0:
      spec = [None] * len(shape)
      spec[axis] = MODEL
      return P(*spec)
  return P()


def fsdp_spec(shape, data_size: int, model_size: int, *,
              min_size: int = MIN_SHARD_SIZE) -> P:
  """PartitionSpec of one array under the 'fsdp' strategy."""
  if int(np.prod(shape)) < min_size or not shape:
    return P()
  order = sorted(range(len(shape)), key=lambda i: (-shape[i], -i))
  for size, axes in ((data_size * model_size, (DATA, MODEL)),
                     (data_size, DATA)):
    if size <= 1:
      continue
    for axis in order:
      if shape[axis] % size == 0:
        spec = [None] * len(shape)
        spec[axis] = axes
        return P(*spec)
  return leaf_spec(shape, model_size, min_size=min_size)


def shards_parameters_over_data(config) -> bool:
  """Whether ``config.mesh.partition_rules`` use 'fsdp'."""
  rules, _ = rules_from_config(config)
  return any(strategy == 'fsdp' for _, strategy in rules)


def tree_shardings(tree: Any, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE,
                   rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> Any:
  """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs)
  under the partition ``rules``."""
  model_size = int(mesh.shape[MODEL]) if MODEL in mesh.axis_names else 1
  data_size = int(mesh.shape[DATA]) if DATA in mesh.axis_names else 1
  compiled = [(re.compile(r), s) for r, s in rules]

  def spec(name, x):
    strategy = next((s for r, s in compiled if r.search(name)), 'replicate')
    if strategy == 'replicate':
      return NamedSharding(mesh, P())
    if strategy == 'fsdp':
      return NamedSharding(mesh, fsdp_spec(np.shape(x), data_size,
                                           model_size, min_size=min_size))
    return NamedSharding(mesh, leaf_spec(np.shape(x), model_size,
                                         min_size=min_size))
  return map_with_paths(spec, tree)


def place_tree(tree: Any, mesh: Mesh, config=None) -> Any:
  """``tree`` (host or device arrays) on ``mesh`` under ``config.mesh``'s
  partition rules.  Arrays already placed that way are not moved, so the
  training state's parameters reach evaluation with their shardings."""
  rules, min_size = rules_from_config(config)
  return jax.device_put(tree, tree_shardings(tree, mesh, min_size=min_size,
                                             rules=rules))


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


def host_allgather(x: np.ndarray) -> np.ndarray:
  """Host numpy rows of every process, concatenated in process order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(np.asarray(x),
                                                      tiled=True))


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every host (all-gathered when a process
  does not hold the whole array)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def from_host(host: np.ndarray, sharding) -> jax.Array:
  """The same value on every process -> a global array on ``sharding``
  (None: this process's default device)."""
  if sharding is None:
    return jax.numpy.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])
