"""Checkpoints written before identical layers were stored stacked.

Such a checkpoint holds ``encoder/layers_0``, ``encoder/layers_1``, ... in
the parameters, the batch statistics and every optimiser tree that mirrors
the parameters (AdamW's moments), where the model now holds one stacked
``encoder/layers`` (``io/conversion/mapping.py``).  ``Checkpointer.restore``
recognises the layout from the checkpoint's recorded array specs, reads it
as written (replicated), verifies its checksums, and stacks it here into
the target's layout and shardings: an old run resumes, converted once, and
its next checkpoint is written stacked.
"""
from __future__ import annotations

import jax
import numpy as np

from ddq_jax.io.conversion.mapping import STACKED, stack_layers
from ddq_jax.io.conversion.mapping import unstack_layers
from ddq_jax.train.parallel.sharding import from_host, to_host

# The top-level modules that hold stacked groups: a dict with one of these
# keys is a tree shaped like the model's variables.
_MODEL_ROOTS = frozenset(g.parent[0] for g in STACKED)


def _is_model_tree(x) -> bool:
  return isinstance(x, dict) and bool(_MODEL_ROOTS & set(x))


def map_model_trees(fn, state):
  """``fn`` applied to every model-shaped dict in ``state`` (parameters,
  batch statistics, moments); everything else unchanged."""
  return jax.tree.map(
      lambda t: fn({'params': t})['params'] if _is_model_tree(t) else t,
      state, is_leaf=_is_model_tree)


def per_layer(abstract_state, sharding_like=None):
  """The per-layer layout of a (canonical) abstract state: the tree a
  checkpoint written before stacking holds.  Each leaf gets the replicated
  sharding ``sharding_like`` suggests (its mesh, or itself), so that every
  process reads the whole old array once."""
  tree = map_model_trees(unstack_layers, abstract_state)
  replicated = _replicated(sharding_like)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      tree)


def stacked(restored_state, target_abstract):
  """A state restored in the per-layer layout -> ``target_abstract``'s
  stacked layout, placed on its shardings."""
  host = to_host(restored_state)
  tree = map_model_trees(stack_layers, host)
  return jax.tree.map(
      lambda x, like: from_host(np.asarray(x, like.dtype),
                             getattr(like, 'sharding', None)),
      tree, target_abstract)


def _replicated(sharding):
  if sharding is None:
    return None
  mesh = getattr(sharding, 'mesh', None)
  if mesh is None:
    return sharding
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
