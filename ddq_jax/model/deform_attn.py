"""mmcv.ops.MultiScaleDeformableAttention (batch_first=True) as a Flax module.

Submodule names follow the torch module (value_proj, sampling_offsets,
attention_weights, output_proj) so converted checkpoints load as they are.
Dropout is omitted (DDQ's configs use 0.0; mmcv applies it to the output
before the residual).

Initialisation = mmcv ``init_weights``: sampling_offsets weight 0, bias the
per-head direction grid scaled by point index; attention_weights 0 / 0;
value_proj and output_proj xavier_uniform, bias 0.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax.model import initializers as inits
from ddq_jax.ops.xla_cpu import exact_divide
from ddq_jax.ops.deform_attn import multi_scale_deformable_attention


class DeformableSizes(nn.Module, kw_only=True):
  """The sizes every deformable-attention module (and the encoder / decoder
  stacks and layers around one) shares, with mmcv's names and defaults."""
  embed_dims: int = 256
  num_heads: int = 8
  num_levels: int = 4
  num_points: int = 4

  def deformable_sizes(self) -> dict:
    """These sizes as keyword arguments."""
    return dict(embed_dims=self.embed_dims, num_heads=self.num_heads,
                num_levels=self.num_levels, num_points=self.num_points)

  @staticmethod
  def sizes_from_config(config) -> dict:
    """embed_dims, num_heads, num_levels, num_points read from a config."""
    return dict(embed_dims=config.embed_dims, num_heads=config.num_heads,
                num_levels=config.num_levels, num_points=config.num_points)


class MultiScaleDeformableAttention(DeformableSizes, kw_only=True):
  """Deformable attention over multi-level values; returns output + identity.

  Attributes:
    embed_dims, num_heads, num_levels, num_points: as mmcv.
    value_proj_ratio: value_proj output size = embed_dims * ratio (mmcv 1.0).
  """
  value_proj_ratio: float = 1.0
  dtype: Any = jnp.float32
  # The sampling op's own backward pass (keeps only its inputs and
  # recomputes corners and gathers); False: plain autodiff, for tests.
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, query: jnp.ndarray, *, value: Optional[jnp.ndarray] = None,
               reference_points: jnp.ndarray,
               spatial_shapes: Sequence[Sequence[int]],
               key_padding_mask: Optional[jnp.ndarray] = None,
               query_pos: Optional[jnp.ndarray] = None,
               identity: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Args:
      query: (B, Q, C).
      value: (B, N, C), N = sum(h * w); None -> query (self-attention).
      reference_points: (B, Q, L, 2) normalised (x, y), or (B, Q, L, 4)
        normalised (cx, cy, w, h) boxes.
      spatial_shapes: static tuple of (h, w) per level.
      key_padding_mask: (B, N) bool, True = padding (value zeroed there).
      query_pos: (B, Q, C) added to the query (not to the identity).
      identity: (B, Q, C) residual; None -> the query before query_pos.

    Returns:
      (B, Q, C) = output_proj(attention) + identity.
    """
    if value is None:
      value = query
    if identity is None:
      identity = query
    if query_pos is not None:
      query = query + query_pos
    b, num_query, _ = query.shape
    _, num_value, _ = value.shape
    h, l, p = self.num_heads, self.num_levels, self.num_points
    assert len(spatial_shapes) == l, (spatial_shapes, l)

    value_dims = int(self.embed_dims * self.value_proj_ratio)
    value = nn.Dense(value_dims, dtype=self.dtype,
                     kernel_init=inits.xavier_uniform, bias_init=inits.zeros,
                     name='value_proj')(value)
    if key_padding_mask is not None:
      value = jnp.where(key_padding_mask[..., None], 0.0, value)
    value = value.reshape(b, num_value, h, value_dims // h)

    sampling_offsets = nn.Dense(
        h * l * p * 2, dtype=self.dtype, kernel_init=inits.zeros,
        bias_init=inits.sampling_offsets_bias(h, l, p),
        name='sampling_offsets')(query)
    sampling_offsets = sampling_offsets.reshape(b, num_query, h, l, p, 2)
    attention_weights = nn.Dense(h * l * p, dtype=self.dtype,
                                 kernel_init=inits.zeros,
                                 bias_init=inits.zeros,
                                 name='attention_weights')(query)
    attention_weights = jax.nn.softmax(
        attention_weights.reshape(b, num_query, h, l * p), axis=-1)
    attention_weights = attention_weights.reshape(b, num_query, h, l, p)

    if reference_points.shape[-1] == 2:
      normalizer = jnp.asarray([(w, hh) for hh, w in spatial_shapes],
                               sampling_offsets.dtype)  # (L, 2) as (w, h)
      sampling_locations = (reference_points[:, :, None, :, None, :] +
                            exact_divide(sampling_offsets,
                                         normalizer[None, None, None, :,
                                                    None, :]))
    elif reference_points.shape[-1] == 4:
      sampling_locations = (reference_points[:, :, None, :, None, :2] +
                            sampling_offsets / p *
                            reference_points[:, :, None, :, None, 2:] * 0.5)
    else:
      raise ValueError('Last dim of reference_points must be 2 or 4, got '
                       f'{reference_points.shape[-1]}')

    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    # The gathered corners (B, H, Q, L*P*4, Dh) would dominate training
    # memory (~1.4 GB per layer at 800x1333); the op's custom VJP keeps only
    # its inputs and recomputes them in the backward pass.
    output = multi_scale_deformable_attention(
        value, spatial_shapes=shapes, sampling_locations=sampling_locations,
        attention_weights=attention_weights, custom_vjp=self.custom_vjp)
    output = nn.Dense(self.embed_dims, dtype=self.dtype,
                      kernel_init=inits.xavier_uniform, bias_init=inits.zeros,
                      name='output_proj')(output)
    return output + identity
