"""Deformable DETR encoder (mmdet DeformableDetrTransformerEncoder) and the
mmcv FFN it (and the decoder) uses.

Param tree: the identical layers stored stacked, every leaf with a leading
axis of ``num_layers`` (the torch name ``encoder.layers.{i}.X`` is entry i
of ``encoder/layers/X``; io/conversion/mapping.py stacks and unstacks):
  layers/self_attn/{value_proj,sampling_offsets,attention_weights,output_proj}
  layers/norms_{0,1}            LayerNorm, eps 1e-5
  layers/ffn/layers_0_0         Linear + ReLU
  layers/ffn/layers_1           Linear
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ddq_jax.model import initializers as inits
from ddq_jax.model import remat as remat_lib
from ddq_jax.model.layer_norm import LayerNorm
from ddq_jax.ops.xla_cpu import exact_divide
from ddq_jax.precision import Precision
from ddq_jax.model.deform_attn import DeformableSizes, MultiScaleDeformableAttention

LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm default


class FFN(nn.Module):
  """mmcv.cnn.bricks.transformer.FFN with num_fcs=2, ReLU, no dropout,
  add_identity=True: ``identity + layers_1(relu(layers_0_0(x)))``.

  Init (inside the encoder / decoder): weights xavier_uniform (the
  detector's pass over every >1-dim parameter), biases torch's Linear
  default U(+-1/sqrt(fan_in))."""
  embed_dims: int = 256
  feedforward_channels: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray,
               identity: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """x: (..., C) -> (..., C); identity defaults to x."""
    if identity is None:
      identity = x
    out = nn.Dense(self.feedforward_channels, dtype=self.dtype,
                   kernel_init=inits.xavier_uniform,
                   bias_init=inits.torch_linear_bias(x.shape[-1]),
                   name='layers_0_0')(x)
    out = nn.relu(out)
    out = nn.Dense(self.embed_dims, dtype=self.dtype,
                   kernel_init=inits.xavier_uniform,
                   bias_init=inits.torch_linear_bias(
                       self.feedforward_channels),
                   name='layers_1')(out)
    return identity + out


def get_encoder_reference_points(*, spatial_shapes: Sequence[Sequence[int]],
                                 valid_ratios: jnp.ndarray) -> jnp.ndarray:
  """Pixel-centre reference points of every level, as mmdet's
  ``get_encoder_reference_points`` (same float32 operation order).

  Args:
    spatial_shapes: static tuple of (h, w) per level.
    valid_ratios: (B, L, 2) valid (w, h) fraction of each level.

  Returns:
    (B, N, L, 2) normalised (x, y), N = sum(h * w).
  """
  valid_ratios = jnp.asarray(valid_ratios, jnp.float32)
  refs = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    ys = np.linspace(0.5, h - 0.5, h, dtype=np.float32)
    xs = np.linspace(0.5, w - 0.5, w, dtype=np.float32)
    ref_y, ref_x = np.meshgrid(ys, xs, indexing='ij')
    ref_y = exact_divide(jnp.asarray(ref_y.reshape(-1))[None],
                         valid_ratios[:, None, lvl, 1] * h)
    ref_x = exact_divide(jnp.asarray(ref_x.reshape(-1))[None],
                         valid_ratios[:, None, lvl, 0] * w)
    refs.append(jnp.stack((ref_x, ref_y), -1))
  reference_points = jnp.concatenate(refs, 1)
  return reference_points[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(DeformableSizes, kw_only=True):
  """self_attn (deformable, residual inside) -> norms_0 -> ffn -> norms_1.

  ``spatial_shapes`` is an attribute (static), so that every call argument
  is an array and the layer can be rematerialised or scanned."""
  spatial_shapes: Sequence[Sequence[int]] = ()
  ffn_dims: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jnp.ndarray, query_pos: jnp.ndarray,
               key_padding_mask: Optional[jnp.ndarray],
               reference_points: jnp.ndarray) -> jnp.ndarray:
    """query, query_pos (B, N, C); key_padding_mask (B, N) or None;
    reference_points (B, N, L, 2) -> (B, N, C)."""
    query = MultiScaleDeformableAttention(
        **self.deformable_sizes(), dtype=self.dtype, name='self_attn')(
            query, value=query, reference_points=reference_points,
            spatial_shapes=self.spatial_shapes,
            key_padding_mask=key_padding_mask, query_pos=query_pos)
    query = LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                         name='norms_0')(query)
    query = FFN(embed_dims=self.embed_dims,
                feedforward_channels=self.ffn_dims, dtype=self.dtype,
                name='ffn')(query)
    return LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                        name='norms_1')(query)


class DeformableEncoder(DeformableSizes, kw_only=True):
  """mmdet DeformableDetrTransformerEncoder: one ``lax.scan`` of
  ``DeformableEncoderLayer`` over the stacked ``layers`` parameters.

  Attributes (besides the sizes):
    remat: 'none' | 'minimal' | 'full', per layer (ddq_jax/model/remat.py).
    scan: a scan loop (the layer compiled once); False unrolls the same
      scan (the same parameters and values).
  """
  num_layers: int = 6
  ffn_dims: int = 1024
  dtype: Any = jnp.float32
  remat: str = 'none'
  scan: bool = True

  @classmethod
  def from_config(cls, config, **kwargs) -> 'DeformableEncoder':
    """Reads num_encoder_layers, embed_dims, num_heads, num_levels,
    num_points, ffn_dims, train.remat.encoder, train.scan_layers,
    train.compute_dtype."""
    kw = dict(num_layers=config.num_encoder_layers,
              **cls.sizes_from_config(config), ffn_dims=config.ffn_dims,
              remat=remat_lib.remat_name(config, 'encoder'),
              scan=remat_lib.scan_layers(config))
    # bfloat16 training computes the encoder in bfloat16 too (LayerNorm
    # statistics stay float32 inside flax); float32 otherwise.
    dtype = Precision.from_config(config).module_dtype
    if dtype is not None:
      kw['dtype'] = dtype
    kw.update(kwargs)
    return cls(**kw)

  @nn.compact
  def __call__(self, query: jnp.ndarray, *, query_pos: jnp.ndarray,
               key_padding_mask: Optional[jnp.ndarray],
               spatial_shapes: Sequence[Sequence[int]],
               valid_ratios: jnp.ndarray) -> jnp.ndarray:
    """Args:
      query: (B, N, C) flattened multi-level features.
      query_pos: (B, N, C) positional + level embedding.
      key_padding_mask: (B, N) bool, True = padding (or None: all valid).
      spatial_shapes: static tuple of (h, w) per level.
      valid_ratios: (B, L, 2) valid (w, h) fraction per level.

    Returns:
      memory (B, N, C).
    """
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    reference_points = get_encoder_reference_points(
        spatial_shapes=spatial_shapes, valid_ratios=valid_ratios)
    kw = dict(spatial_shapes=spatial_shapes, **self.deformable_sizes(),
              ffn_dims=self.ffn_dims, dtype=self.dtype)
    layer = DeformableEncoderLayer(**kw)
    args = (query_pos, key_padding_mask, reference_points)
    params = remat_lib.stacked_params(self, 'layers', layer, self.num_layers,
                                      query, *args)
    return remat_lib.scan_stacked(
        layer, query, args, {'params': params},
        policy=remat_lib.checkpoint_policy(self.remat),
        remat=self.remat != 'none', unroll=not self.scan)
