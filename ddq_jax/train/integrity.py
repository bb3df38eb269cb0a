"""Facts about a TrainState and a config that make checkpoints trustworthy.

    state_fingerprint(state) -> (checksums {path: int}, all_finite bool)
    config_differences(saved, current, allowed=...) -> [(key, saved, now)]

The checksum of a leaf is computed in-graph on its raw bits (sum of
``bits * (2654435761 * i + 1)`` modulo 2**32 over the flattened leaf): integer
sums wrap and commute, so the value does not depend on the mesh, the
sharding or the process count a checkpoint is restored into, and one
flipped bit or two swapped values change it.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.tree_paths import leaf_paths

CHECKSUM_ALGO = 'u32-position-weighted-sum-v1'

# Config keys that may change when a run resumes (prefixes of dotted keys):
# run length, logging / evaluation / checkpoint cadence, data loading,
# the device layout, the fault guards, and how matching is computed (every
# solver is exact), and the layer plan (scans and remat never change values).
# Everything else must equal the checkpoint's config.
RESUME_MAY_CHANGE = (
    'train.max_steps', 'train.log_every', 'train.eval_every',
    'train.checkpoint_every', 'train.keep_checkpoints', 'train.init_from',
    'train.init_from_partial',
    'train.max_nonfinite_steps', 'train.inject_nan_at_steps',
    'train.resume_may_change', 'eval.', 'mesh.', 'data.num_workers',
    'loss.hungarian_solver', 'train.memory', 'train.scan_layers',
    'train.remat.')


def _leaf_bits(x: jax.Array) -> jax.Array:
  """The leaf's raw bits as uint32 (flattened)."""
  x = jnp.ravel(x)
  if jnp.issubdtype(x.dtype, jnp.bool_):
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if size == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  if size == 8:  # (n, 2) uint32 halves
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  raise TypeError(f'cannot checksum dtype {x.dtype}')


def _leaf_checksum(x: jax.Array) -> jax.Array:
  bits = _leaf_bits(x)
  pos = jax.lax.iota(jnp.uint32, bits.shape[0])
  return jnp.sum(bits * (pos * jnp.uint32(2654435761) + jnp.uint32(1)),
                 dtype=jnp.uint32)


def _leaf_finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.bool_(True)


@jax.jit
def _leaf_stats(x):
  # One small jit per leaf shape (cached), not one program over the whole
  # tree: a tree-wide jit of ~2k reductions takes minutes to compile.
  return _leaf_checksum(x), _leaf_finite(x)


def _host_leaf_stats(x: np.ndarray) -> tuple[int, bool]:
  """_leaf_stats in numpy (same uint32 wrap-around arithmetic)."""
  x = np.ascontiguousarray(x).reshape(-1)
  if x.dtype == np.bool_:
    bits = x.astype(np.uint32)
  else:
    size = x.dtype.itemsize
    view = {4: np.uint32, 2: np.uint16, 1: np.uint8, 8: np.uint32}[size]
    bits = x.view(view).astype(np.uint32)
  pos = np.arange(bits.shape[0], dtype=np.uint32)
  with np.errstate(over='ignore'):
    s = np.sum(bits * (pos * np.uint32(2654435761) + np.uint32(1)),
               dtype=np.uint32)
  finite = (not np.issubdtype(x.dtype, np.inexact)) or bool(
      np.all(np.isfinite(x)))
  return int(s), finite


def _fingerprint(leaves):
  if all(getattr(x, 'is_fully_addressable', True) for x in leaves):
    # one process holds everything: numpy, no compilation
    stats = [_host_leaf_stats(np.asarray(x)) for x in jax.device_get(leaves)]
    return [s for s, _ in stats], all(f for _, f in stats)
  stats = [_leaf_stats(x) for x in leaves]  # multi-host: in-graph
  return ([int(s) for s, _ in jax.device_get(stats)],
          all(bool(f) for _, f in jax.device_get(stats)))


def state_fingerprint(state) -> tuple[dict[str, int], bool]:
  """Per-leaf checksums and whether every float leaf is finite.

  Args:
    state: any pytree of (possibly sharded, multi-process) arrays.
  Returns:
    ({leaf path: uint32 checksum as int}, all floats finite).  When one
    process holds every array they are copied to the host and summed in
    numpy (R50 4-scale params + AdamW moments, 146M values: ~1 s, no
    compilation); otherwise one small jit per leaf shape computes the same
    numbers in-graph.
  """
  leaves = jax.tree.leaves(state)
  sums, finite = _fingerprint(leaves)
  return ({p: int(s) for p, s in zip(leaf_paths(state), sums)},
          bool(finite))


def checksum_mismatches(expected: dict, actual: dict) -> list[str]:
  """Leaf paths whose checksum differs (or exist on one side only)."""
  keys = sorted(set(expected) | set(actual))
  return [k for k in keys if expected.get(k) != actual.get(k)]


# ---------------------------------------------------------------- configs
def config_to_dict(config) -> Any:
  """A config (ConfigDict / dict) as plain JSON values (tuples -> lists)."""
  if config is None:
    return None
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _flatten(d: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: d}


def config_differences(saved: dict, current: dict, *,
                       may_change: Iterable[str] = RESUME_MAY_CHANGE
                       ) -> list[tuple[str, Any, Any]]:
  """Dotted keys whose values differ between two configs (JSON dicts),
  except those starting with one of ``may_change``.  Keys present on one
  side only are left out (``config_keys_added_or_removed``: a newer
  version's new keys must not block a resume).  Returns [(key, saved
  value, current value)], sorted."""
  a, b = _flatten(saved or {}), _flatten(current or {})
  may_change = tuple(may_change)
  return [(k, a[k], b[k]) for k in sorted(set(a) & set(b))
          if not k.startswith(may_change) and a[k] != b[k]]


def config_keys_added_or_removed(saved: dict, current: dict) -> list[str]:
  """Dotted keys present in only one of two configs (JSON dicts)."""
  a, b = _flatten(saved or {}), _flatten(current or {})
  return sorted(set(a) ^ set(b))


def host_all_finite(tree) -> bool:
  """Whether every float leaf of a host (numpy) tree is finite."""
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))
