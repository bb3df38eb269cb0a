"""Exact linear sum assignment (Hungarian matching) for static shapes.

``hungarian_match(cost, row_valid=, col_valid=, solver=)`` solves the
assignment on the *valid sub-matrix* (rows with ``row_valid``, columns with
``col_valid``, in their original order) exactly as
``scipy.optimize.linear_sum_assignment`` does on that sub-matrix, and
returns for every row the matched column (-1 = unmatched or invalid row).

Two solvers, one result:

- ``'scipy'``: ``jax.pure_callback`` into scipy (host round trip; the
  callback itself extracts the valid sub-matrix, so the result is scipy's
  bit for bit, in float64 like the reference). vmap-able (one callback per
  batch).
- ``'jax'``: a transcription of scipy's own algorithm
  (scipy/optimize/rectangular_lsap: Crouse's shortest augmenting path,
  the same row order, the same reversed ``remaining`` list with its
  swap-remove and the same tie-break that prefers an unassigned column) in
  ``lax.while_loop``s over the static padded matrix; runs inside jit on
  device. Like scipy it transposes a valid block with more valid rows than
  valid columns. It works in the cost's dtype: with a float64 cost
  (jax_enable_x64) its assignment is scipy's (1.17) bit for bit, ties
  included; in float32 only ties and near-ties (~1e-7 relative) may be
  broken differently (e.g. which copy of a repeated
  top-k column a row gets), the optimum being exact up to that rounding.
  Work: min(#valid rows, #valid cols) augmenting paths, each a
  ``lax.while_loop`` of O(max(Q, G)) vector steps over one static
  (min(Q, G), max(Q, G)) buffer.

No gradient flows through either (the cost is ``stop_gradient``-ed).
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from ddq_jax import backend

# ----------------------------------------------------------------------------
# scipy through a host callback
# ----------------------------------------------------------------------------


def _scipy_one(cost: np.ndarray, row_valid: np.ndarray,
               col_valid: np.ndarray) -> np.ndarray:
  q = cost.shape[0]
  out = np.full((q,), -1, np.int32)
  rows = np.nonzero(row_valid)[0]
  cols = np.nonzero(col_valid)[0]
  if rows.size == 0 or cols.size == 0:
    return out
  sub = np.asarray(cost, np.float64)[np.ix_(rows, cols)]
  r, c = linear_sum_assignment(sub)
  out[rows[r]] = cols[c]
  return out


def _scipy_host(cost, row_valid, col_valid):
  cost = np.asarray(cost)
  row_valid = np.asarray(row_valid)
  col_valid = np.asarray(col_valid)
  lead = cost.shape[:-2]
  q, g = cost.shape[-2:]
  cost = cost.reshape((-1, q, g))
  rv = np.broadcast_to(row_valid, lead + (q,)).reshape((-1, q))
  cv = np.broadcast_to(col_valid, lead + (g,)).reshape((-1, g))
  out = np.stack([_scipy_one(c, r, v) for c, r, v in zip(cost, rv, cv)])
  return out.reshape(lead + (q,))


def _match_scipy(cost, row_valid, col_valid):
  q = cost.shape[-2]
  shape = jax.ShapeDtypeStruct(cost.shape[:-2] + (q,), jnp.int32)
  return jax.pure_callback(_scipy_host, shape, cost, row_valid, col_valid,
                           vmap_method='broadcast_all')


# ----------------------------------------------------------------------------
# pure JAX: scipy's rectangular_lsap, vectorised over the columns
# ----------------------------------------------------------------------------


def _augment(*, path, sink, cur, col4row, row4col):
  """scipy's augmentation along ``path`` from ``sink`` back to row ``cur``:
  (col4row (R,), row4col (C,)).  Guarded: with NaN / inf costs a path
  pointer may be unset; the result is then garbage, as scipy would raise,
  but never a hang."""
  num_r = col4row.shape[0]

  def aug_body(a):
    j, _, n, col4row, row4col = a
    i = path[j]
    ok = i >= 0
    i0 = jnp.maximum(i, 0)
    row4col = row4col.at[j].set(jnp.where(ok, i, row4col[j]))
    j_next = jnp.where(ok, col4row[i0], -1)
    col4row = col4row.at[i0].set(jnp.where(ok, j, col4row[i0]))
    return (j_next, i, n + 1, col4row, row4col)

  def aug_cond(a):
    return (a[1] != cur) & (a[0] >= 0) & (a[2] <= num_r)

  _, _, _, col4row, row4col = jax.lax.while_loop(
      aug_cond, aug_body,
      (sink, jnp.array(-1, jnp.int32), jnp.array(0, jnp.int32), col4row,
       row4col))
  return col4row, row4col


def _lsap_core(cost: jnp.ndarray, nr: jnp.ndarray,
               nc: jnp.ndarray) -> jnp.ndarray:
  """scipy's ``solve`` on ``cost[:nr, :nc]`` (needs nr <= nc), static (R, C).

  Returns ``col4row`` (R,) int32, -1 for rows >= nr.

  scipy keeps the unvisited columns in a list ``remaining`` (initially
  reversed, shrunk by swap-remove) and scans it in order; here ``pos[j]`` is
  column j's position in that list (-1 once removed or inactive), so the
  scan's choice (the first minimum, or the last minimum whose column is
  still unassigned) becomes reductions over ``pos``.
  """
  num_r, num_c = cost.shape
  dtype = cost.dtype
  inf = jnp.array(jnp.inf, dtype)
  big = jnp.iinfo(jnp.int32).max
  ar_r = jnp.arange(num_r, dtype=jnp.int32)
  ar_c = jnp.arange(num_c, dtype=jnp.int32)
  nr = nr.astype(jnp.int32)
  nc = nc.astype(jnp.int32)
  col_active = ar_c < nc
  active = (ar_r[:, None] < nr) & col_active[None, :]
  # (some scipy versions shift the costs by their minimum first; the one
  # installed here, 1.17, does not, and neither do we)
  cost = jnp.where(active, cost, 0)
  pos0 = jnp.where(col_active, nc - 1 - ar_c, -1)

  def augmenting_path(state):
    """scipy's ``augmenting_path`` + dual update + augmentation for ``cur``."""
    (cur, u, v, col4row, row4col, path) = state

    def body(s):
      (i, min_val, pos, num_rem, sr, spc, path, sink) = s
      sr = sr.at[i].set(True)
      in_rem = pos >= 0
      r = min_val + cost[i] - u[i] - v
      upd = in_rem & (r < spc)
      path = jnp.where(upd, i, path)
      spc = jnp.where(upd, r, spc)
      low = jnp.min(jnp.where(in_rem, spc, inf))
      is_min = in_rem & (spc == low)
      free_min = is_min & (row4col == -1)
      j_free = jnp.argmax(jnp.where(free_min, pos, -1)).astype(jnp.int32)
      j_first = jnp.argmin(jnp.where(is_min, pos, big)).astype(jnp.int32)
      j = jnp.where(jnp.any(free_min), j_free, j_first)
      new_sink = jnp.where(row4col[j] == -1, j, -1)
      i = jnp.where(new_sink == -1, row4col[j], i)
      # remaining[index] = remaining[--num_remaining]
      last = jnp.argmax(pos == num_rem - 1).astype(jnp.int32)
      pos = pos.at[last].set(pos[j])
      pos = pos.at[j].set(-1)
      return (i, low, pos, num_rem - 1, sr, spc, path, new_sink)

    def cond(s):
      return (s[7] == -1) & (s[3] > 0)

    s0 = (cur, jnp.array(0, dtype), pos0, nc, jnp.zeros((num_r,), bool),
          jnp.full((num_c,), inf), path, jnp.array(-1, jnp.int32))
    (_, min_val, pos, _, sr, spc, path, sink) = jax.lax.while_loop(
        cond, body, s0)
    sc = col_active & (pos < 0)

    # dual update
    u = u.at[cur].add(min_val)
    others = sr & (ar_r != cur)
    u = jnp.where(others, u + (min_val - spc[jnp.maximum(col4row, 0)]), u)
    v = jnp.where(sc, v - (min_val - spc), v)

    col4row, row4col = _augment(path=path, sink=sink, cur=cur,
                                col4row=col4row, row4col=row4col)
    return (cur + 1, u, v, col4row, row4col, path)

  state0 = (jnp.array(0, jnp.int32), jnp.zeros((num_r,), dtype),
            jnp.zeros((num_c,), dtype), jnp.full((num_r,), -1, jnp.int32),
            jnp.full((num_c,), -1, jnp.int32),
            jnp.full((num_c,), -1, jnp.int32))
  state = jax.lax.while_loop(lambda s: s[0] < nr, augmenting_path, state0)
  return state[3]


def _compact_order(valid: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Stable permutation putting valid entries first, and their count."""
  order = jnp.argsort(~valid, stable=True).astype(jnp.int32)
  return order, jnp.sum(valid).astype(jnp.int32)


def _fit(x: jnp.ndarray, shape) -> jnp.ndarray:
  """Top-left crop / zero pad of a 2-d array to a static shape."""
  x = x[:shape[0], :shape[1]]
  return jnp.pad(x, ((0, shape[0] - x.shape[0]), (0, shape[1] - x.shape[1])))


def _match_jax(cost, row_valid, col_valid):
  q, g = cost.shape
  if cost.dtype not in (jnp.float32, jnp.float64):
    cost = cost.astype(jnp.float32)  # ints, bf16 / f16
  perm_r, n_r = _compact_order(row_valid)
  perm_c, n_c = _compact_order(col_valid)
  sub = cost[perm_r][:, perm_c]
  sub = jnp.where((jnp.arange(q) < n_r)[:, None] & (jnp.arange(g) < n_c),
                  sub, 0)
  # scipy transposes a valid block with more rows than columns. One static
  # buffer (min(Q,G), max(Q,G)) holds either orientation: the one that
  # does not match the static shape is always small enough to fit.
  transpose = n_c < n_r
  shape = (min(q, g), max(q, g))
  buf = jnp.where(transpose, _fit(sub.T, shape), _fit(sub, shape))
  nr = jnp.where(transpose, n_c, n_r)
  nc = jnp.where(transpose, n_r, n_c)
  c4r = _lsap_core(buf, nr, nc)  # (min(Q, G),) compact col (row) per row
  ok = c4r >= 0
  a = jnp.arange(shape[0], dtype=jnp.int32)
  c4r0 = jnp.maximum(c4r, 0)
  # compact query / gt index of each matched pair
  cq = jnp.where(transpose, c4r0, a)
  cg = jnp.where(transpose, a, c4r0)
  tgt_row = jnp.where(ok, perm_r[jnp.minimum(cq, q - 1)], q)
  out = jnp.full((q,), -1, jnp.int32)
  return out.at[tgt_row].set(perm_c[jnp.minimum(cg, g - 1)], mode='drop')


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def hungarian_match(cost: jnp.ndarray, *, row_valid: jnp.ndarray = None,
                    col_valid: jnp.ndarray = None,
                    solver: str = 'scipy') -> jnp.ndarray:
  """Minimum-cost one-to-one matching of one image.

  Args:
    cost: (Q, G) float cost (queries x ground truths).
    row_valid: (Q,) bool, rows that may be matched (default all).
    col_valid: (G,) bool, columns that may be matched (default all).
    solver: 'scipy' (host callback) or 'jax' (on device).

  Returns:
    (Q,) int32: the matched column of each row, -1 if unmatched. Exactly
    min(#valid rows, #valid cols) rows are matched, all of them valid, to
    valid columns; the matching is scipy's on the valid sub-matrix.
  """
  q, g = cost.shape
  cost = jax.lax.stop_gradient(cost)
  # Non-finite costs (a diverged step, which the train step then does not
  # apply) must neither crash the host solver nor stall the JAX one.
  cost = jnp.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
  row_valid = (jnp.ones((q,), bool) if row_valid is None
               else jnp.asarray(row_valid, bool))
  col_valid = (jnp.ones((g,), bool) if col_valid is None
               else jnp.asarray(col_valid, bool))
  if solver == 'scipy':
    return _match_scipy(cost, row_valid, col_valid)
  if solver == 'jax':
    return _match_jax(cost, row_valid, col_valid)
  raise ValueError(f'unknown solver {solver!r}')


def hungarian_match_batched(cost: jnp.ndarray, *, row_valid: jnp.ndarray = None,
                            col_valid: jnp.ndarray = None,
                            solver: str = 'scipy',
                            sequential: bool = False) -> jnp.ndarray:
  """``hungarian_match`` over leading dims: (..., Q, G), (..., Q), (..., G)
  -> (..., Q); ``row_valid`` / ``col_valid`` broadcast against them.

  ``vmap`` (one host callback for 'scipy' whatever the leading dims; for
  'jax' the loops run in lock-step, good on GPU).  ``sequential=True`` runs
  the 'jax' solver matrix after matrix with ``lax.map`` instead (less work
  on CPU).
  """
  lead = cost.shape[:-2]
  q, g = cost.shape[-2:]
  row_valid = (jnp.ones(lead + (q,), bool) if row_valid is None
               else jnp.broadcast_to(jnp.asarray(row_valid, bool), lead + (q,)))
  col_valid = (jnp.ones(lead + (g,), bool) if col_valid is None
               else jnp.broadcast_to(jnp.asarray(col_valid, bool), lead + (g,)))
  flat = (cost.reshape((-1, q, g)), row_valid.reshape((-1, q)),
          col_valid.reshape((-1, g)))
  fn = lambda c, r, v: hungarian_match(c, row_valid=r, col_valid=v,
                                       solver=solver)
  if sequential and solver == 'jax':
    out = jax.lax.map(lambda a: fn(*a), flat)
  else:
    out = jax.vmap(fn)(*flat)
  return out.reshape(lead + (q,))


def resolve_solver(name: str, *, num_devices: int = 1) -> str:
  """The one place ``loss.hungarian_solver`` is resolved.

  'auto' -> 'scipy' for a single-device step on the CPU (fastest to
  compile, exact), 'jax' otherwise: on accelerators it avoids a host round
  trip per step, and on a multi-device mesh every device would wait for
  its host callback each step.
  """
  if name not in ('auto', 'scipy', 'jax'):
    raise ValueError(f"loss.hungarian_solver={name!r}: expected 'auto', "
                     "'scipy' or 'jax'")
  if name != 'auto':
    return name
  single_cpu = num_devices == 1 and backend.is_cpu()
  return 'scipy' if single_cpu else 'jax'
