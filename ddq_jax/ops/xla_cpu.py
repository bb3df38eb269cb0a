"""Formulations that keep XLA from changing the numbers (or the program).

XLA rewrites arithmetic it sees whole: it fuses a multiply into the next
add (one fused multiply-add, one rounding instead of two), turns a division
by a broadcast operand into a multiplication by its reciprocal (two
roundings instead of one), recomputes a fused producer once per consumer,
and drops an ``optimization_barrier`` in places.  torch rounds every kernel
on its own, so parity with the reference needs each of these prevented
where it matters.  Each helper here says what it prevents and where it was
seen; all of them apply on every backend (the same program, the same
numbers), and they matter most on XLA:CPU, the backend parity and the
training trajectory are measured on.  Backend-dependent choices live in
``ddq_jax.backend``.

* ``run_unfused``: a one-trip ``while`` whose result XLA must materialise;
* ``opaque_zero`` / ``rounded_alone``: a product rounded before the next
  add (no FMA);
* ``exact_divide``: a division rounded once;
* ``coordinate_extents``: (x2 - x1, y2 - y1) as a +-1 matrix, no slicing;
* ``merged_call``: several same-shaped calls as one (padded, stacked).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def run_unfused(fn: Callable, carry, *, trips: jax.Array):
  """``fn(carry)`` (a tree shaped like ``carry``) applied ``trips`` times
  (0 or 1, traced) in a ``while`` loop whose result XLA has to materialise.

  XLA cannot prove the loop runs once, so its result is a buffer: XLA
  cannot push consumers (the optimiser's per-parameter slices of a flat
  update) back into ``fn``.  Without it XLA:CPU recomputed the whole
  AdamW update once per parameter (and ``optimization_barrier`` did not
  stop it).  ``trips=0`` returns ``carry`` bit for bit (the non-finite
  guard of ``train/flat_optimizer.py``)."""
  trips = jnp.asarray(trips, jnp.int32)

  def body(state):
    i, c = state
    return i + 1, fn(c)
  _, out = jax.lax.while_loop(lambda state: state[0] < trips, body,
                              (jnp.zeros((), jnp.int32), carry))
  return out


def opaque_zero(count: jax.Array) -> jax.Array:
  """An int32 scalar 0 that XLA cannot prove is 0: ``min(count, 0)`` of a
  non-negative traced counter (the optimiser's step count).  For
  ``rounded_alone``."""
  return jnp.minimum(count, 0)


def rounded_alone(x: jax.Array, zero: jax.Array) -> jax.Array:
  """``x`` with ``zero`` (``opaque_zero``) OR-ed into its bits: the same
  value, but XLA must round ``x`` on its own before using it.

  Without it XLA fuses a product with the add that consumes it into one
  fused multiply-add (one rounding), where torch rounds the product in its
  own kernel: AdamW's ``p * (1 - lr * wd)`` before ``+ update`` drifted by
  an ulp per step on XLA:CPU (the training trajectory check)."""
  bits = jnp.dtype(f'int{jnp.dtype(x.dtype).itemsize * 8}')
  return jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(x, bits) | zero.astype(bits), x.dtype)


def exact_divide(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """``num / den`` rounded once, as torch divides (IEEE float32).

  XLA's algebraic simplifier rewrites a division by a broadcast operand into
  a multiplication by its reciprocal, which rounds twice: (49 + 0.5) / 50
  gives 0.98999995 instead of 0.99, and the proposal validity test
  (``< 0.99``) then keeps a row (or column) of a 50-long level that the
  reference drops.  Materialising the divisor behind an optimisation
  barrier keeps the true division.  num, den: broadcastable arrays.
  """
  shape = jnp.broadcast_shapes(jnp.shape(num), jnp.shape(den))
  den = jax.lax.optimization_barrier(jnp.broadcast_to(den, shape))
  return num / den


# (x1, y1, x2, y2) -> (x2 - x1, y2 - y1) as a matrix.
_EXTENT = ((-1.0, 0.0), (0.0, -1.0), (1.0, 0.0), (0.0, 1.0))


def coordinate_extents(boxes: jnp.ndarray) -> jnp.ndarray:
  """(..., 4) xyxy -> (..., 2) (x2 - x1, y2 - y1), as ``boxes @ _EXTENT``
  summed over the coordinates: each output has one rounded addition, so
  the value is the coordinate-wise formula's, bit for bit, and no
  coordinate is sliced out (the overlaps' backward pass has one fused loop
  instead of a pad per coordinate, which XLA:CPU ran as separate loops).
  Finite boxes only: inf * 0 is nan."""
  m = jnp.asarray(_EXTENT, boxes.dtype)
  return jnp.sum(boxes[..., :, None] * m, axis=-2)


def merged_call(fn: Callable, sets: Sequence[Sequence[jnp.ndarray]],
                pad_values: Sequence, *, axis: int):
  """``fn`` once on several argument sets instead of once per set.

  ``sets``: argument tuples whose arrays agree but for the leading (stack)
  axis and ``axis`` (padded to the longest with ``pad_values``, one per
  argument: values the computation must ignore, e.g. masked queries);
  the sets are concatenated on axis 0 and ``fn(*stacked)`` runs once.
  ``fn`` must treat each leading-axis row on its own (its own sums), so a
  row's result is what a separate call would give, bit for bit.  Returns
  ``fn``'s result (rows in the order of ``sets``).  One call instead of
  several is a smaller program (the distinct, encoder and denoising set
  losses: thousands of HLO lines fewer on XLA:CPU, a faster compile and
  step)."""
  q = max(s[0].shape[axis] for s in sets)

  def pad(x, v):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, q - x.shape[axis])
    return jnp.pad(x, widths, constant_values=v)
  stacked = [jnp.concatenate([pad(s[k], v) for s in sets], 0)
             for k, v in enumerate(pad_values)]
  return fn(*stacked)
