"""backend.platform(): the one place backend-specific formulations are
chosen, and both sides of each choice agree on the CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax import backend
from ddq_jax.losses.hungarian import resolve_solver
from ddq_jax.model.decoder import MultiheadAttention
from ddq_jax.ops import nms


def test_platform_follows_target():
  assert backend.platform() == 'cpu'
  with backend.target_platform('tpu'):
    assert backend.platform() == 'tpu' and not backend.is_cpu()
    with backend.target_platform('gpu'):
      assert backend.per_image_attention_projections()
    assert not backend.per_image_attention_projections()
    assert not backend.conv_weight_grad_by_taps(kernel=1, in_loop=True)
    assert not backend.conv_1x1_as_matmul()
  assert backend.platform() == 'cpu'
  assert backend.conv_1x1_as_matmul()
  assert backend.conv_weight_grad_by_taps(kernel=3, in_loop=True)
  assert backend.conv_weight_grad_by_taps(kernel=1, in_loop=False)
  assert not backend.conv_weight_grad_by_taps(kernel=3, in_loop=False)
  with pytest.raises(ValueError, match='expected one of'):
    with backend.target_platform('cuda'):
      pass


def test_choices_follow_platform():
  assert resolve_solver('auto', num_devices=1) == 'scipy'
  with backend.target_platform('gpu'):
    assert resolve_solver('auto', num_devices=1) == 'jax'
  sup = jnp.asarray(np.random.default_rng(0).random((12, 12)) > 0.6)
  valid = jnp.ones(12, bool)
  with backend.target_platform('tpu'):
    text = str(jax.make_jaxpr(lambda s, v: nms.greedy_nms_sorted(
        s, v, method='auto'))(sup, valid))
  assert 'while' in text  # the fixed-point loop, not the fori_loop scan
  keep_cpu = nms.greedy_nms_sorted(sup, valid, method='auto')
  with backend.target_platform('tpu'):
    keep_tpu = nms.greedy_nms_sorted(sup, valid, method='auto')
  np.testing.assert_array_equal(keep_cpu, keep_tpu)


def test_per_image_projections_equal_plain():
  """The GPU formulation of the decoder self-attention (per-image q/k/v and
  out projections) has the same parameters and, on the CPU, the same
  outputs and gradients as the plain one."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((2, 23, 32)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 23, 23)) > 0.8)
  mha = MultiheadAttention(32, 4)
  variables = mha.init(jax.random.PRNGKey(0), q, q, q, mask)

  def run(v, x):
    return mha.apply(v, x, x, x, mask)

  def loss(v, x):
    return jnp.sum(run(v, x) ** 2)
  plain = run(variables, q)
  g_plain = jax.grad(loss, argnums=(0, 1))(variables, q)
  with backend.target_platform('gpu'):
    v_gpu = mha.init(jax.random.PRNGKey(0), q, q, q, mask)
    per_image = run(variables, q)
    g_gpu = jax.grad(loss, argnums=(0, 1))(variables, q)
  assert jax.tree.structure(v_gpu) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(v_gpu), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(per_image, plain, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_gpu), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
