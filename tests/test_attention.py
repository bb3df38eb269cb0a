"""ops/attention.py: the blocked self-attention (recomputing backward)
equals the plain formulation up to float32 rounding, in values and in
gradients, with padded blocks, fully blocked rows and every mask form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax import backend
from ddq_jax.model.decoder import MultiheadAttention
from ddq_jax.ops.attention import attention


def _inputs(b=2, nq=23, nk=23, h=4, d=8, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                for s in ((b, nq, h, d), (b, nk, h, d), (b, nk, h, d),
                          (b, nq, h, d)))
  mask = rng.random((b, nq, nk)) > 0.7
  mask[0, 3] = True  # a fully blocked row: uniform weights, finite
  return q, k, v, g, jnp.asarray(mask)


def _value_and_grads(mask, block, q, k, v, g):
  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, mask=mask, query_block=block) * g)
  out = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask,
                                          query_block=block))(q, k, v)
  return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize('block', [1, 5, 8, 23, 64])
@pytest.mark.parametrize('mask_kind', ['3d', '2d', 'none'])
def test_blocked_equals_plain(block, mask_kind):
  q, k, v, g, mask = _inputs()
  mask = {'3d': mask, '2d': mask[0], 'none': None}[mask_kind]
  out0, grads0 = _value_and_grads(mask, 0, q, k, v, g)
  out1, grads1 = _value_and_grads(mask, block, q, k, v, g)
  assert out1.shape == out0.shape
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
  for a, b in zip(grads1, grads0):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_keys_other_than_queries():
  q, k, v, g, mask = _inputs(nq=13, nk=29)
  out0, grads0 = _value_and_grads(mask, 0, q, k, v, g)
  out1, grads1 = _value_and_grads(mask, 4, q, k, v, g)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
  for a, b in zip(grads1, grads0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_query_block_choice():
  """Blocks on XLA:CPU only past one block's worth of queries; GPU and TPU
  keep the plain formulation."""
  n = backend.CPU_ATTENTION_QUERY_BLOCK
  assert backend.attention_query_block(n) == 0
  assert backend.attention_query_block(n + 1) == n
  for name in ('gpu', 'tpu'):
    with backend.target_platform(name):
      assert backend.attention_query_block(10 * n) == 0


def test_module_blocks_above_the_threshold(monkeypatch):
  """MultiheadAttention with more queries than a block: the blocked path,
  the plain path's outputs and gradients."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((1, 40, 16)), jnp.float32)
  mask = jnp.asarray(rng.random((1, 40, 40)) > 0.8)
  mha = MultiheadAttention(16, 2)
  variables = mha.init(jax.random.PRNGKey(0), x, x, x, mask)

  def loss(v, x):
    return jnp.sum(mha.apply(v, x, x, x, mask) ** 2)
  results = {}
  for block in (0, 16):
    monkeypatch.setattr(backend, 'CPU_ATTENTION_QUERY_BLOCK', block or 10**6)
    # a new function each time: make_jaxpr caches traces by function
    text = str(jax.make_jaxpr(lambda v, x: loss(v, x))(variables, x))
    assert ('custom_vjp_call' in text) == bool(block)
    results[block] = (
        mha.apply(variables, x, x, x, mask),
        jax.grad(lambda v, x: loss(v, x), argnums=(0, 1))(variables, x))
  np.testing.assert_allclose(results[16][0], results[0][0], rtol=1e-5,
                             atol=1e-6)
  for a, b in zip(jax.tree.leaves(results[16][1]),
                  jax.tree.leaves(results[0][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_gradients_keep_their_dtypes():
  q, k, v, g, mask = _inputs(nq=40, nk=40)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, mask=mask, query_block=8)
                   .astype(jnp.float32) * g)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  assert all(x.dtype == jnp.bfloat16 for x in grads)
  assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in grads)


def _segmented_inputs(bounds=(0, 9, 20, 23), seed=1):
  """Inputs whose mask blocks every pair across the segments of
  ``bounds`` (no row fully blocked), with random blocks inside."""
  q, k, v, g, _ = _inputs(seed=seed)
  rng = np.random.default_rng(seed)
  b, n = q.shape[:2]
  mask = np.ones((b, n, n), bool)
  for s, e in zip(bounds, bounds[1:]):
    mask[:, s:e, s:e] = rng.random((b, e - s, e - s)) > 0.6
  mask[:, np.arange(n), np.arange(n)] = False
  segments = tuple(zip(bounds, bounds[1:]))
  return q, k, v, g, jnp.asarray(mask), segments


@pytest.mark.parametrize('block', [0, 4])
def test_segments_equal_the_whole_mask(block):
  """Segments computed apart = the plain formulation over the whole mask
  (values and gradients, up to float32 summation order)."""
  q, k, v, g, mask, segments = _segmented_inputs()

  def run(segs):
    def f(q, k, v):
      return attention(q, k, v, mask=mask, query_block=block, segments=segs)
    out = jax.jit(f)(q, k, v)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * g),
                             argnums=(0, 1, 2)))(q, k, v)
    return out, grads
  out0, grads0 = run(())
  out1, grads1 = run(segments)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
  for a, b in zip(grads1, grads0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_segments_read_only_their_own_blocks():
  """The blocks between segments are not read: opening them changes
  nothing, and the cost is the segments' alone."""
  q, k, v, _, mask, segments = _segmented_inputs()
  opened = jnp.zeros_like(mask).at[:, :9, :9].set(mask[:, :9, :9])
  opened = opened.at[:, 9:20, 9:20].set(mask[:, 9:20, 9:20])
  opened = opened.at[:, 20:, 20:].set(mask[:, 20:, 20:])
  a = attention(q, k, v, mask=mask, segments=segments)
  b = attention(q, k, v, mask=opened, segments=segments)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('segments', [((0, 9), (10, 23)), ((0, 9), (9, 22)),
                                      ((0, 9), (9, 9), (9, 23))])
def test_segments_must_tile_the_queries(segments):
  q, k, v, _, mask, _ = _segmented_inputs()
  with pytest.raises(ValueError, match='tile'):
    attention(q, k, v, mask=mask, segments=segments)
