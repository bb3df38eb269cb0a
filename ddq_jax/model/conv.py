"""A bias-free NHWC convolution whose weight gradient the backend chooses.

``conv(...)`` is flax's ``nn.Conv`` (the reference's ``Conv2d(bias=False)``
with symmetric padding, HWIO kernel), or, for a trainable convolution where
``backend.conv_weight_grad_by_taps`` says so (XLA:CPU: 1x1 kernels, and any
kernel inside a scanned layer), ``TapGradConv``: the same 'kernel'
parameter, init and forward numbers, with the weight gradient as one
im2col matmul (``ops/conv.py``).  Where ``backend.conv_1x1_as_matmul``
says so (XLA:CPU), every unpadded 1x1 convolution, trainable or frozen, is
a ``TapGradConv`` computing a matmul.  Used by the ResNet backbone and the
ChannelMapper neck.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax import backend
from ddq_jax.ops.conv import conv2d, conv2d_tap_weight_grad


class TapGradConv(nn.Module):
  """``nn.Conv`` as ``conv`` builds it (the same 'kernel' parameter and
  forward numbers) with the weight gradient of ``conv2d_tap_weight_grad``;
  ``pointwise_matmul``: a 1x1 kernel as a matmul (``ops/conv.py``);
  ``trainable`` False: the weight gets no gradient of its own (the plain
  ``conv2d``)."""
  features: int
  kernel: int
  stride: int
  padding: int
  kernel_init: Callable
  pointwise_matmul: bool = False
  trainable: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.param('kernel', self.kernel_init,
                   (self.kernel, self.kernel, x.shape[-1], self.features),
                   jnp.float32)
    x, k = nn.dtypes.promote_dtype(x, k, dtype=None)
    if not self.trainable:
      return conv2d(x, k, self.stride, self.padding,
                    pointwise_matmul=self.pointwise_matmul)
    return conv2d_tap_weight_grad(x, k, self.stride, self.padding,
                                  self.pointwise_matmul)


def conv(features: int, kernel: int, stride: int, padding: int, name: str, *,
         kernel_init: Callable, trainable: bool = False,
         in_loop: bool = False) -> nn.Module:
  """A ``kernel`` x ``kernel`` convolution without bias; ``trainable`` (its
  weight gets a gradient) and ``in_loop`` (inside a scan) let the backend
  choose its weight gradient (``backend.conv_weight_grad_by_taps``)."""
  pointwise = kernel == 1 and padding == 0 and backend.conv_1x1_as_matmul()
  if pointwise or (trainable and backend.conv_weight_grad_by_taps(
      kernel=kernel, in_loop=in_loop)):
    return TapGradConv(features, kernel, stride, padding,
                       kernel_init=kernel_init, pointwise_matmul=pointwise,
                       trainable=trainable, name=name)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 use_bias=False, kernel_init=kernel_init, name=name)
