"""LayerNorm over the last axis: flax's forward, with its own VJP on XLA:CPU.

``LayerNorm`` has flax ``nn.LayerNorm``'s parameters (``scale`` ones,
``bias`` zeros, float32) and computes its forward with the same operations
in the same order (statistics in at least float32; with ``fast_variance``
var = max(0, E[x^2] - E[x]^2), else E[(x - E[x])^2]; then
``(x - mean) * (rsqrt(var + eps) * scale) + bias``), so its values are
flax's bit for bit.

Where ``backend.layer_norm_own_vjp()`` says so (XLA:CPU) the gradient is
the closed form instead of JAX's derivative of those operations:

    xh = (x - mean) * r,  r = rsqrt(var + eps)
    d_bias = sum(dy),  d_scale = sum(dy * xh)   (over every row)
    dx = r * (g - mean(g) - xh * mean(g * xh)),  g = dy * scale

On the 2-core CPU host one encoder norm of the R50 step (22,323 x 256)
took about 100 ms forward and backward with the derived gradient (a chain
of broadcasts and several passes) and 20-25 ms with this one.  Values equal
the derived gradient up to float32 rounding.  GPU and TPU keep the derived
gradient.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax import backend


def _statistics(x, fast_variance: bool):
  """Mean and variance over the last axis, in at least float32 (flax's
  ``_compute_stats``)."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = xf.mean(-1)
  if fast_variance:
    var = jnp.maximum(0.0, jnp.square(xf).mean(-1) - jnp.square(mean))
  else:
    var = jnp.square(xf - mean[..., None]).mean(-1)
  return mean, var


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *,
               epsilon: float, fast_variance: bool, dtype: Any = None,
               own_vjp: bool = False) -> jax.Array:
  """LayerNorm of ``x`` (..., C) over C; scale, bias (C,).  Returns
  (..., C) in ``dtype`` (default: the promoted dtype of x and the
  parameters).  ``own_vjp``: the closed-form gradient (module docstring)."""
  out_dtype = dtype or jnp.result_type(x, scale, bias)
  if own_vjp:
    return _layer_norm_own_vjp(x, scale, bias, epsilon, fast_variance,
                               jnp.dtype(out_dtype))
  return _forward(x, scale, bias, epsilon, fast_variance, out_dtype)[0]


def _forward(x, scale, bias, epsilon, fast_variance, out_dtype):
  mean, var = _statistics(x, fast_variance)
  r = jax.lax.rsqrt(var[..., None] + epsilon)
  y = x - mean[..., None]
  y = y * (r * scale)
  y = y + bias
  return jnp.asarray(y, out_dtype), (mean, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer_norm_own_vjp(x, scale, bias, epsilon, fast_variance, out_dtype):
  return _forward(x, scale, bias, epsilon, fast_variance, out_dtype)[0]


def _own_fwd(x, scale, bias, epsilon, fast_variance, out_dtype):
  y, (mean, r) = _forward(x, scale, bias, epsilon, fast_variance, out_dtype)
  return y, (x, scale, bias, mean, r)


def _own_bwd(epsilon, fast_variance, out_dtype, res, dy):
  del epsilon, fast_variance, out_dtype
  x, scale, bias, mean, r = res
  f32 = r.dtype
  c = x.shape[-1]
  xh = (x.astype(f32) - mean[..., None]) * r
  dy = dy.astype(f32)
  rows_dy, rows_xh = dy.reshape(-1, c), xh.reshape(-1, c)
  d_scale = jnp.einsum('nc,nc->c', rows_dy, rows_xh)
  d_bias = jnp.sum(rows_dy, axis=0)
  g = dy * scale.astype(f32)
  dx = r * (g - g.mean(-1, keepdims=True) -
            xh * (g * xh).mean(-1, keepdims=True))
  return (dx.astype(x.dtype), d_scale.astype(scale.dtype),
          d_bias.astype(bias.dtype))


_layer_norm_own_vjp.defvjp(_own_fwd, _own_bwd)


class LayerNorm(nn.Module):
  """``nn.LayerNorm`` over the last axis (same parameters, same values);
  its gradient as ``layer_norm`` with ``backend.layer_norm_own_vjp()``."""
  epsilon: float = 1e-6
  dtype: Any = None
  fast_variance: bool = True  # flax's use_fast_variance

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return layer_norm(x, scale, bias, epsilon=self.epsilon,
                      fast_variance=self.fast_variance, dtype=self.dtype,
                      own_vjp=backend.layer_norm_own_vjp())
