"""NHWC convolution whose weight gradient is one im2col matmul.

XLA:CPU computes a convolution's weight gradient about 30x slower inside a
``while`` body (a scanned layer) than outside one: 15.2 s against 0.5 s
for a 3x3, 128 -> 128 convolution at 100x168 (benchmarks/RESULTS.md).  The
same gradient as one matmul of the input each tap saw (im2col) with the
output cotangent is fast in both places.  The forward pass and
the input gradient stay XLA's convolution (the same numbers); only the
weight gradient's summation order differs from XLA's.

``conv2d(..., pointwise_matmul=True)``: an unpadded 1x1 convolution as a
matmul of the (strided) input with the (Cin, Cout) kernel, forward and
input gradient (see ``backend.conv_1x1_as_matmul``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def conv2d(x, kernel, stride: int, padding: int, *,
           pointwise_matmul: bool = False):
  """Conv2d, x (B, H, W, Cin), kernel (kh, kw, Cin, Cout), symmetric
  ``padding``, ``stride`` -> (B, Ho, Wo, Cout): XLA's convolution, or, for
  an unpadded 1x1 kernel with ``pointwise_matmul``, the (strided) input
  times the (Cin, Cout) matrix (``backend.conv_1x1_as_matmul``)."""
  kh, kw = kernel.shape[:2]
  if pointwise_matmul and kh == kw == 1 and padding == 0:
    if stride > 1:
      x = x[:, ::stride, ::stride]
    return jnp.einsum('nhwc,co->nhwo', x, kernel[0, 0])
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_tap_weight_grad(x, kernel, stride: int, padding: int,
                           pointwise_matmul: bool = False):
  """``conv2d`` (same arguments) whose weight gradient is one im2col
  matmul of the input each kernel tap saw with the output cotangent.
  """
  return conv2d(x, kernel, stride, padding, pointwise_matmul=pointwise_matmul)


def _fwd(x, kernel, stride, padding, pointwise_matmul):
  return conv2d(x, kernel, stride, padding,
                pointwise_matmul=pointwise_matmul), (x, kernel)


def _bwd(stride, padding, pointwise_matmul, res, g):
  x, kernel = res
  _, vjp_x = jax.vjp(lambda v: conv2d(v, kernel, stride, padding,
                                      pointwise_matmul=pointwise_matmul), x)
  (dx,) = vjp_x(g)
  kh, kw, cin, cout = kernel.shape
  b, ho, wo, _ = g.shape
  if kh == kw == 1 and stride == 1 and padding == 0:  # the input itself
    # The matmul's left operand is laid out channels-first (a transposing
    # copy, with its elementwise producers fused in): make it the narrower
    # of input and cotangent.  R50 training step on XLA:CPU: the backbone's
    # copies 2.0 -> 0.8 s.
    if cout < cin:
      dk = jnp.einsum('nhwo,nhwc->oc', g, x).T.reshape(kernel.shape)
    else:
      dk = jnp.einsum('nhwc,nhwo->co', x, g).reshape(kernel.shape)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  # The input each tap saw, (B, Ho, Wo, taps, Cin), then one matmul.
  cols = jnp.stack([jax.lax.slice(
      xp, (0, dy, dxx, 0),
      (b, dy + stride * (ho - 1) + 1, dxx + stride * (wo - 1) + 1, cin),
      (1, stride, stride, 1)) for dy in range(kh) for dxx in range(kw)], 3)
  dk = jnp.einsum('nhwtc,nhwo->tco', cols, g).reshape(kh, kw, cin, cout)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv2d_tap_weight_grad.defvjp(_fwd, _bwd)
