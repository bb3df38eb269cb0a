"""Flax initializers reproducing the reference's (torch / mmengine / mmcv)
parameter initialisation, so that ``model.init`` starts training where
mmdetection 3.3.0 would (``DDQDETR.init_weights``).

Flax kernels are (in, out) for Dense and HWIO for Conv; jax's
``variance_scaling`` computes fan_in / fan_out on those layouts exactly as
torch does on (out, in) / OIHW, so the bounds agree.

Where each is used (the reference's final state after ``init_weights``):
  * torch ``nn.Linear`` default (``torch_linear_kernel`` /
    ``torch_linear_bias``): kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
    weight, U(+-1/sqrt(fan_in)) bias.  The head's branch layers, query_map,
    and every bias of the encoder / decoder Linears not re-initialised.
  * ``xavier_uniform``: every >1-dim parameter of the encoder and decoder,
    memory_trans_fc's weight, the ChannelMapper convs (init_cfg Xavier).
  * ``kaiming_normal_fan_out``: mmengine KaimingInit defaults (normal, not
    truncated, mode fan_out, relu) for the ResNet convs.
  * ``sampling_offsets_bias``: mmcv MultiScaleDeformableAttention's grid.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Initializer = Callable[..., jax.Array]

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones
# mmengine kaiming_init(a=0, mode='fan_out', nonlinearity='relu',
# distribution='normal'): N(0, 2 / fan_out), untruncated.
kaiming_normal_fan_out = nn.initializers.variance_scaling(
    2.0, 'fan_out', 'normal')
# torch nn.Embedding default: N(0, 1).
normal_std1 = nn.initializers.normal(1.0)
# torch nn.Linear default weight: kaiming_uniform_(a=sqrt(5)) ->
# bound = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in).
torch_linear_kernel = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform')


def torch_linear_bias(fan_in: int) -> Initializer:
  """torch nn.Linear default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def constant(value: float) -> Initializer:
  return nn.initializers.constant(value)


def bias_init_with_prob(prior_prob: float) -> float:
  """mmengine ``bias_init_with_prob``: -log((1 - p) / p)."""
  return float(-np.log((1 - prior_prob) / prior_prob))


def with_fixed_key(init: Initializer, key: jax.Array) -> Initializer:
  """``init`` drawing from ``key`` whatever key Flax passes: modules built
  with the same fixed key start identical (the reference's deepcopied
  branches)."""
  def fixed(_, shape, dtype=jnp.float32):
    return init(key, shape, dtype)
  return fixed


def sampling_offsets_grid(num_heads: int, num_levels: int,
                          num_points: int) -> np.ndarray:
  """mmcv MultiScaleDeformableAttention.init_weights' sampling_offsets bias,
  (num_heads * num_levels * num_points * 2,) float32: head h points along
  angle 2 pi h / num_heads, scaled so the larger |component| is 1, times the
  point index + 1; the same for every level."""
  thetas = np.arange(num_heads, dtype=np.float32) * np.float32(
      2.0 * math.pi / num_heads)
  grid = np.stack([np.cos(thetas), np.sin(thetas)], -1).astype(np.float32)
  grid = grid / np.abs(grid).max(-1, keepdims=True)
  grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
  grid = grid * np.arange(1, num_points + 1, dtype=np.float32)[None, None, :,
                                                                 None]
  return grid.reshape(-1).astype(np.float32)


def sampling_offsets_bias(num_heads: int, num_levels: int,
                          num_points: int) -> Initializer:
  grid = sampling_offsets_grid(num_heads, num_levels, num_points)

  def init(key, shape, dtype=jnp.float32):
    del key
    assert tuple(shape) == grid.shape, (shape, grid.shape)
    return jnp.asarray(grid, dtype)
  return init
