"""ddq_jax.ops.xla_cpu: each helper gives the plain formula's value."""
import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.ops import xla_cpu


def test_run_unfused_zero_and_one_trip():
  carry = (jnp.arange(3.0), jnp.ones((2,)))
  fn = lambda c: (c[0] * 2, c[1] + 1)  # noqa: E731
  for trips, want in ((0, carry), (1, fn(carry))):
    got = jax.jit(lambda c, t: xla_cpu.run_unfused(fn, c, trips=t))(
        carry, trips)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)


def test_rounded_alone_is_the_product():
  rng = np.random.default_rng(0)
  p = rng.normal(size=1000).astype(np.float32)
  d = np.float32(1 - 1e-4 * 0.05)

  @jax.jit
  def f(p, count):
    return xla_cpu.rounded_alone(p * d, xla_cpu.opaque_zero(count)) + 1e-3
  got = np.asarray(f(p, jnp.int32(7)))
  np.testing.assert_array_equal(got, (p * d).astype(np.float32) +
                                np.float32(1e-3))
  assert int(xla_cpu.opaque_zero(jnp.int32(5))) == 0


def test_exact_divide_rounds_once():
  num = np.float32(49.5)
  got = jax.jit(xla_cpu.exact_divide)(jnp.full((3,), num), jnp.float32(50))
  np.testing.assert_array_equal(np.asarray(got), np.float32(0.99))


def test_coordinate_extents():
  boxes = np.array([[1.5, 2.25, 4.0, 9.5], [0.1, 0.2, 0.3, 0.7]], np.float32)
  got = np.asarray(xla_cpu.coordinate_extents(jnp.asarray(boxes)))
  np.testing.assert_array_equal(
      got, np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]],
                    -1))


def test_merged_call_matches_separate_calls():
  rng = np.random.default_rng(1)
  a = (rng.normal(size=(2, 3, 5)).astype(np.float32),
       rng.random((2, 3, 5)) > 0.3)
  b = (rng.normal(size=(1, 3, 4)).astype(np.float32),
       rng.random((1, 3, 4)) > 0.3)
  fn = lambda x, m: jnp.sum(jnp.where(m, x, 0.0), (-2, -1))  # noqa: E731
  got = xla_cpu.merged_call(fn, [a, b], (0.0, False), axis=2)
  want = np.concatenate([fn(*a), fn(*b)])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
