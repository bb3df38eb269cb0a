"""Integer index arithmetic for indices known to be in range.

jnp's ``//``, ``%`` and ``take_along_axis`` handle negative operands
(floor rounding, negative indices, out-of-range fills): a handful of
compares and selects per use, in every fusion that reads the result.  The
static-shape layouts (denoising slots, the 1-to-k columns) only ever hold
non-negative, in-range indices, for which these are the same and simpler.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def div_nonneg(a, b):
  """a // b for a >= 0, b > 0 (integers; b may be a scalar)."""
  a = jnp.asarray(a)
  return jax.lax.div(a, jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def rem_nonneg(a, b):
  """a % b for a >= 0, b > 0 (integers; b may be a scalar)."""
  a = jnp.asarray(a)
  return jax.lax.rem(a, jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def take_along_axis_in_range(arr, indices, axis: int):
  """``jnp.take_along_axis`` for indices in [0, arr.shape[axis])."""
  return jnp.take_along_axis(arr, jnp.asarray(indices).astype(jnp.uint32),
                             axis=axis, mode='promise_in_bounds')


def take_in_range(arr, indices, axis: int):
  """``jnp.take`` for indices in [0, arr.shape[axis]) (clamped, never
  filled: jnp.take has no 'promise_in_bounds')."""
  return jnp.take(arr, jnp.asarray(indices).astype(jnp.uint32), axis=axis,
                  mode='clip')
