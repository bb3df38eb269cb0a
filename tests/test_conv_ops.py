"""conv2d_tap_weight_grad: XLA's convolution forward and input gradient (the
same numbers), the weight gradient as one im2col matmul (float32 rounding
only), inside a scan as outside; and the folded frozen BatchNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax.model.resnet import fold_frozen_bn
from ddq_jax.model.conv import TapGradConv, conv
from ddq_jax.ops.conv import conv2d, conv2d_tap_weight_grad


def _xla_conv(x, k, stride, padding):
  return jax.lax.conv_general_dilated(
      x, k, (stride, stride), ((padding, padding),) * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# (1, 1, 0) twice: fewer output than input channels and more (the 1x1
# weight gradient transposes the narrower operand).
@pytest.mark.parametrize('kernel,stride,padding,cout', [
    (1, 1, 0, 5), (1, 1, 0, 8), (3, 1, 1, 5), (3, 2, 1, 5), (1, 2, 0, 5),
    (7, 2, 3, 5)])
def test_conv_tap_weight_grad(kernel, stride, padding, cout):
  r = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(r.normal(size=(2, 21, 16, 6)).astype(np.float32))
  k = jnp.asarray(r.normal(size=(3, kernel, kernel, 6, cout)).astype(
      np.float32))

  def scanned(conv):
    def loss(x, k):
      def body(c, kk):
        return c, jnp.sum(jnp.tanh(conv(x, kk, stride, padding)))
      return jnp.sum(jax.lax.scan(body, 0.0, k)[1])
    return jax.jit(jax.grad(loss, (0, 1)))

  np.testing.assert_array_equal(
      conv2d_tap_weight_grad(x, k[0], stride, padding),
      _xla_conv(x, k[0], stride, padding))
  (dx, dk), (dx0, dk0) = (scanned(conv2d_tap_weight_grad)(x, k),
                          scanned(_xla_conv)(x, k))
  np.testing.assert_allclose(dx, dx0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dk, dk0, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(dk0).max()))


@pytest.mark.parametrize('stride,cout', [(1, 5), (1, 8), (2, 5)])
def test_pointwise_matmul_is_the_convolution(stride, cout):
  """An unpadded 1x1 convolution as a matmul: XLA's convolution's values
  and gradients up to float32 rounding (plain and tap weight gradient)."""
  r = np.random.default_rng(stride * 10 + cout)
  x = jnp.asarray(r.normal(size=(2, 21, 16, 6)).astype(np.float32))
  k = jnp.asarray(r.normal(size=(1, 1, 6, cout)).astype(np.float32))
  want = _xla_conv(x, k, stride, 0)
  for fn in (lambda x, k: conv2d(x, k, stride, 0, pointwise_matmul=True),
             lambda x, k: conv2d_tap_weight_grad(x, k, stride, 0, True)):
    np.testing.assert_allclose(fn(x, k), want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda x, k: jnp.sum(jnp.tanh(fn(x, k))), (0, 1))(x, k)
    grads0 = jax.grad(lambda x, k: jnp.sum(jnp.tanh(_xla_conv(x, k, stride,
                                                              0))),
                      (0, 1))(x, k)
    for a, b in zip(grads, grads0):
      np.testing.assert_allclose(a, b, rtol=1e-5,
                                 atol=1e-5 * float(jnp.abs(b).max()))


def test_backend_conv_modules():
  """``conv``: on XLA:CPU every unpadded 1x1 kernel (trainable or frozen)
  is the matmul module, a frozen 3x3 outside loops is flax's; on TPU and
  GPU a 1x1 is flax's ``nn.Conv``; the 'kernel' parameter is the same."""
  init = jax.nn.initializers.lecun_normal()
  m = conv(4, 1, 2, 0, 'c', kernel_init=init)
  assert isinstance(m, TapGradConv) and m.pointwise_matmul
  assert not m.trainable
  assert not isinstance(conv(4, 3, 1, 1, 'c', kernel_init=init), TapGradConv)
  from ddq_jax import backend
  with backend.target_platform('tpu'):
    ref = conv(4, 1, 2, 0, 'c', kernel_init=init, trainable=True)
  assert not isinstance(ref, TapGradConv)
  x = jnp.ones((1, 6, 6, 3))
  v = ref.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, m.init(jax.random.PRNGKey(0), x)) == (
      jax.tree.map(jnp.shape, v))
  np.testing.assert_allclose(m.apply(v, x), ref.apply(v, x), rtol=1e-6)


def test_folded_batchnorm_is_the_formula():
  r = np.random.default_rng(0)
  c = 7
  p = {'scale': jnp.asarray(r.normal(size=c), jnp.float32),
       'bias': jnp.asarray(r.normal(size=c), jnp.float32)}
  s = {'mean': jnp.asarray(r.normal(size=c), jnp.float32),
       'var': jnp.asarray(r.random(c) + 0.1, jnp.float32)}
  mul, shift = fold_frozen_bn(p, s, eps=1e-5)
  x = jnp.asarray(r.normal(size=(3, c)), jnp.float32)
  want = (x - s['mean']) / jnp.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']
  np.testing.assert_allclose(x * mul + shift, want, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(fold_frozen_bn(p, s)[0]))(p)
  assert not np.asarray(g['scale']).any()  # frozen: no gradient
  g = jax.grad(lambda p: jnp.sum(fold_frozen_bn(p, s, trainable=True)[0]))(p)
  assert np.asarray(g['scale']).all()
