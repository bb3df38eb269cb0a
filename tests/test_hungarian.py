"""Hungarian matching: both solvers against scipy on the valid sub-matrix."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from ddq_jax.losses.hungarian import hungarian_match
from ddq_jax.losses.hungarian import hungarian_match_batched

SOLVERS = ('scipy', 'jax')


def _jitted(solver):
  return jax.jit(lambda c, r, v: hungarian_match(
      c, row_valid=r, col_valid=v, solver=solver))


_FNS = {s: _jitted(s) for s in SOLVERS}


def _reference(cost, rv, cv):
  """scipy on the valid sub-matrix -> (Q,) gt index, -1 unmatched."""
  out = np.full(cost.shape[0], -1, np.int32)
  rows, cols = np.nonzero(rv)[0], np.nonzero(cv)[0]
  if rows.size and cols.size:
    r, c = linear_sum_assignment(cost[np.ix_(rows, cols)].astype(np.float64))
    out[rows[r]] = cols[c]
  return out


def _total(cost, m):
  idx = np.nonzero(m >= 0)[0]
  return float(cost[idx, m[idx]].astype(np.float64).sum())


def _check(cost, rv, cv, solver, *, exact=True):
  m = np.asarray(_FNS[solver](cost, rv, cv))
  ref = _reference(cost, rv, cv)
  # a valid matching of the right size on valid rows / columns only
  assert (m >= 0).sum() == min(rv.sum(), cv.sum())
  assert np.all(rv[m >= 0]) and np.all(cv[m[m >= 0]])
  assert len(set(m[m >= 0].tolist())) == (m >= 0).sum()
  np.testing.assert_allclose(_total(cost, m), _total(cost, ref),
                             rtol=1e-5, atol=1e-5)
  if exact:
    np.testing.assert_array_equal(m, ref)
  return m


def _masks(rng, q, g, nq, ng):
  rv = np.zeros(q, bool)
  rv[rng.choice(q, nq, replace=False)] = True
  cv = np.zeros(g, bool)
  cv[rng.choice(g, ng, replace=False)] = True
  return rv, cv


# one static canvas (12, 9); the masks make the valid blocks square, wide
# and tall (scipy transposes tall ones, so does the JAX solver)
VALID_SHAPES = [(9, 9), (12, 9), (12, 5), (5, 9), (3, 8), (9, 2), (1, 1)]


@pytest.mark.parametrize('solver', SOLVERS)
def test_random_costs(solver):
  rng = np.random.default_rng(0)
  for nq, ng in VALID_SHAPES:
    for _ in range(4):
      cost = rng.normal(size=(12, 9)).astype(np.float32)
      rv, cv = _masks(rng, 12, 9, nq, ng)
      _check(cost, rv, cv, solver)


@pytest.mark.parametrize('solver', SOLVERS)
def test_ties_identical_to_scipy(solver):
  # small integer costs: many optimal matchings; the JAX solver replays
  # scipy's tie-breaking, so even the assignment is the same.
  rng = np.random.default_rng(1)
  for nq, ng in VALID_SHAPES:
    for _ in range(4):
      cost = rng.integers(0, 3, (12, 9)).astype(np.float32)
      rv, cv = _masks(rng, 12, 9, nq, ng)
      _check(cost, rv, cv, solver, exact=True)
  const = np.ones((12, 9), np.float32)  # scipy gives the identity
  _check(const, np.ones(12, bool), np.ones(9, bool), solver)
  _check(const, np.arange(12) < 6, np.arange(9) < 6, solver)


@pytest.mark.parametrize('solver', SOLVERS)
def test_topk_repeated_columns(solver):
  # TopkHungarianAssigner: each gt column repeated topk times
  rng = np.random.default_rng(2)
  base = rng.normal(size=(45, 6)).astype(np.float32)
  cost = np.repeat(base, 4, axis=1)
  for cv in (np.repeat(np.array([1, 1, 1, 0, 0, 0], bool), 4),
             np.ones(24, bool)):
    rv = np.ones(45, bool)
    # float32 rounding may swap two copies of the same gt (bit-identical
    # to scipy in float64); the gt each row gets is the same.
    m = _check(cost, rv, cv, solver, exact=solver == 'scipy')
    np.testing.assert_array_equal(m // 4, _reference(cost, rv, cv) // 4)


def test_jax_solver_float64_bit_identical():
  """With a float64 cost the JAX solver replays scipy exactly, ties of
  repeated top-k columns included."""
  rng = np.random.default_rng(2)
  cost = np.repeat(rng.normal(size=(45, 6)), 4, axis=1)
  cv = np.repeat(np.array([1, 1, 1, 1, 0, 1], bool), 4)
  rv = rng.random(45) < 0.9
  with jax.enable_x64(True):
    m = jax.jit(lambda c, r, v: hungarian_match(
        c, row_valid=r, col_valid=v, solver='jax'))(
            jnp.asarray(cost, jnp.float64), rv, cv)
    m = np.asarray(m)
  np.testing.assert_array_equal(m, _reference(cost, rv, cv))


@pytest.mark.parametrize('solver', SOLVERS)
def test_degenerate_masks(solver):
  rng = np.random.default_rng(3)
  cost = rng.normal(size=(12, 9)).astype(np.float32)[:, :4]
  cost = np.pad(cost, ((0, 0), (0, 5)))
  # zero valid gt: nothing matched
  m = _check(cost, np.ones(12, bool), np.zeros(9, bool), solver)
  assert np.all(m == -1)
  # no valid row
  m = _check(cost, np.zeros(12, bool), np.ones(9, bool), solver)
  assert np.all(m == -1)
  # all rows masked but one: it takes its cheapest valid gt
  rv = np.zeros(12, bool)
  rv[6] = True
  cv = np.array([True, False, True, True] + [False] * 5)
  m = _check(cost, rv, cv, solver)
  valid_cols = np.nonzero(cv)[0]
  assert m[6] == valid_cols[np.argmin(cost[6, cv])]
  # garbage (nan / inf) in masked entries never matters
  bad = cost.copy()
  bad[~rv] = np.nan
  bad[:, 1] = np.inf
  m2 = np.asarray(_FNS[solver](bad, rv, cv))
  np.testing.assert_array_equal(m, m2)


@pytest.mark.parametrize('solver', SOLVERS)
def test_batched_and_grad(solver):
  rng = np.random.default_rng(4)
  cost = rng.normal(size=(3, 20, 5)).astype(np.float32)
  rv = rng.random((3, 20)) < 0.7
  cv = rng.random((3, 5)) < 0.7
  cv[1] = False
  out = jax.jit(lambda c, r, v: hungarian_match_batched(
      c, row_valid=r, col_valid=v, solver=solver))(cost, rv, cv)
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(out[b]),
                                  _reference(cost[b], rv[b], cv[b]))

  if solver == 'jax':
    seq = jax.jit(lambda c, r, v: hungarian_match_batched(
        c, row_valid=r, col_valid=v, solver=solver, sequential=True))(
            cost, rv, cv)
    np.testing.assert_array_equal(np.asarray(seq), np.asarray(out))

  def loss(c):
    m = hungarian_match(c, solver=solver)
    return jnp.sum(jnp.where(m >= 0, c[jnp.arange(20), jnp.maximum(m, 0)], 0))

  g = jax.grad(loss)(jnp.asarray(cost[0]))
  assert g.shape == (20, 5) and float(jnp.abs(g).sum()) == 5.0


def test_jax_solver_terminates_on_nan():
  """scipy raises on NaN costs; the JAX solver must still return (garbage
  allowed) instead of hanging inside jit."""
  rng = np.random.default_rng(6)
  cost = rng.normal(size=(12, 9)).astype(np.float32)
  cost[::2, 1::3] = np.nan
  cost[3] = np.inf
  m = np.asarray(_FNS['jax'](cost, np.ones(12, bool), np.ones(9, bool)))
  assert m.shape == (12,)


def test_solver_speed_report():
  """(900 + 1350) x 100, float32: both solvers agree; prints the timings."""
  rng = np.random.default_rng(5)
  q, g = 900 + 1350, 100
  cost = rng.random((q, g)).astype(np.float32) * 10
  rv = np.ones(q, bool)
  cv = np.ones(g, bool)
  times = {}
  res = {}
  for solver in SOLVERS:
    fn = _FNS[solver]
    res[solver] = np.asarray(fn(cost, rv, cv))  # compile
    t0 = time.perf_counter()
    for _ in range(3):
      res[solver] = np.asarray(jax.block_until_ready(fn(cost, rv, cv)))
    times[solver] = (time.perf_counter() - t0) / 3
  print(f'\nhungarian {q}x{g} on {jax.default_backend()}: ' +
        ', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in times.items()))
  np.testing.assert_array_equal(res['jax'], res['scipy'])
