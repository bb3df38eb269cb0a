"""model/layer_norm.py: flax's LayerNorm forward bit for bit, and its own
closed-form gradient (XLA:CPU) equal to the derived one up to rounding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax import backend
from ddq_jax.model.layer_norm import LayerNorm, layer_norm


def _data(shape=(2, 37, 24), seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  scale = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  return x, g, scale, bias


@pytest.mark.parametrize('fast_variance', [True, False])
@pytest.mark.parametrize('dtype', [None, jnp.bfloat16])
def test_values_are_flax(fast_variance, dtype):
  x, _, scale, bias = _data()
  params = {'params': {'scale': scale, 'bias': bias}}
  ref = jax.jit(nn.LayerNorm(epsilon=1e-5, dtype=dtype,
                             use_fast_variance=fast_variance).apply)(params, x)
  ours = LayerNorm(epsilon=1e-5, dtype=dtype, fast_variance=fast_variance)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == \
      jax.tree.map(jnp.shape, params)
  for own in (False, True):
    out = jax.jit(lambda x: layer_norm(
        x, scale, bias, epsilon=1e-5, fast_variance=fast_variance,
        dtype=dtype, own_vjp=own))(x)
    assert out.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(ref, np.float32))


@pytest.mark.parametrize('fast_variance', [True, False])
def test_own_gradient_equals_derived(fast_variance):
  x, g, scale, bias = _data()

  def loss(own):
    def f(x, scale, bias):
      return jnp.sum(layer_norm(x, scale, bias, epsilon=1e-5,
                                fast_variance=fast_variance,
                                own_vjp=own) * g)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, scale, bias)
  for a, b in zip(loss(True), loss(False)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_bfloat16_input_gradient_dtypes():
  x, g, scale, bias = _data()
  xb = x.astype(jnp.bfloat16)

  def f(x, scale, bias):
    return jnp.sum(layer_norm(x, scale, bias, epsilon=1e-5, fast_variance=True,
                              dtype=jnp.bfloat16, own_vjp=True)
                   .astype(jnp.float32) * g)
  dx, ds, db = jax.grad(f, argnums=(0, 1, 2))(xb, scale, bias)
  assert (dx.dtype, ds.dtype, db.dtype) == (jnp.bfloat16, jnp.float32,
                                            jnp.float32)


def test_choice_follows_platform():
  assert backend.layer_norm_own_vjp()
  for name in ('gpu', 'tpu'):
    with backend.target_platform(name):
      assert not backend.layer_norm_own_vjp()
