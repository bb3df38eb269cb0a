"""Multi-scale encoder inputs: deformable_detr.py ``pre_transformer``.

Turns the neck's maps, the image padding mask and the level embedding into
the flattened sequences the encoder consumes.  Pure; shapes are static.
When no image is padded the reference passes no mask; an all-False mask
gives the same positions, masks and valid ratios (tested).

Level masks: the reference resizes the image mask to each level by nearest
neighbour (``level_masks``, batched padding).  Padding-invariant mode builds
them from each image's unpadded map sizes (``level_masks_from_extents``):
when a stride does not divide the canvas the two differ.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from ddq_jax.model.extents import extent_valid
from ddq_jax.model.positional_encoding import interpolate_mask_nearest, sine_embed_coordinates, sine_encode, valid_ratio


@flax.struct.dataclass
class MultiScaleInputs:
  """Encoder inputs (a pytree; the two shape tuples are static metadata).

  feat_flatten: (B, N, C) level-major, row-major flattened features.
  lvl_pos_embed_flatten: (B, N, C) sine position + level_embed[l].
  mask_flatten: (B, N) bool, True = padding.
  valid_ratios: (B, L, 2) float32 (r_w, r_h) per level.
  spatial_shapes: ((h_0, w_0), ...) static, L entries.
  level_start_index: (0, h_0*w_0, ...) static, L entries.
  """
  feat_flatten: jax.Array
  lvl_pos_embed_flatten: jax.Array
  mask_flatten: jax.Array
  valid_ratios: jax.Array
  spatial_shapes: tuple[tuple[int, int], ...] = flax.struct.field(
      pytree_node=False, default=())
  level_start_index: tuple[int, ...] = flax.struct.field(
      pytree_node=False, default=())


def level_masks(pad_mask: jax.Array, *,
                spatial_shapes: Sequence[tuple[int, int]]) -> list[jax.Array]:
  """(B, H, W) bool -> [(B, h_l, w_l) bool] by torch's nearest interpolate."""
  return [interpolate_mask_nearest(pad_mask, size=s) for s in spatial_shapes]


def level_masks_from_extents(extents: jax.Array, *,
                             strides: Sequence[int],
                             spatial_shapes: Sequence[tuple[int, int]]
                             ) -> list[jax.Array]:
  """(B, 2) image (h, w) -> [(B, h_l, w_l) bool, True = padding]: outside
  ceil((h, w) / stride_l), the size of level l at batch 1 unpadded."""
  return [~extent_valid(extents, stride=s, shape=shape)
          for s, shape in zip(strides, spatial_shapes)]


def prepare_multiscale_inputs(feats: Sequence[jax.Array], *,
                              pad_mask: jax.Array,
                              level_embed: jax.Array,
                              temperature: float = 20.,
                              offset: float = 0.,
                              normalize: bool = True,
                              scale: float = 2 * math.pi,
                              eps: float = 1e-6,
                              masks: Optional[Sequence[jax.Array]] = None
                              ) -> MultiScaleInputs:
  """The reference's pre_transformer, NHWC in.

  Args:
    feats: L neck outputs, each (B, h_l, w_l, C) NHWC.
    pad_mask: (B, H, W) bool on the input canvas, True = padding.
    level_embed: (L, C) learned level embedding.
    temperature, offset, normalize, scale, eps: SinePositionalEncoding
      settings (num_feats = C // 2); DDQ uses temperature 20, offset 0.
    masks: optional [(B, h_l, w_l) bool] level masks (True = padding), e.g.
      ``level_masks_from_extents``; default: nearest resize of pad_mask.
  Returns:
    MultiScaleInputs (N = sum_l h_l * w_l).
  """
  spatial_shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in feats)
  starts, n = [], 0
  for h, w in spatial_shapes:
    starts.append(n)
    n += h * w
  if masks is None:
    masks = level_masks(pad_mask, spatial_shapes=spatial_shapes)
  feat_flat, y_flat, x_flat, lvl_flat, mask_flat, ratios = ([], [], [], [],
                                                            [], [])
  for lvl, (feat, mask) in enumerate(zip(feats, masks)):
    b, h, w, c = feat.shape
    y_embed, x_embed = sine_embed_coordinates(
        mask, normalize=normalize, scale=scale, eps=eps, offset=offset)
    feat_flat.append(feat.reshape(b, h * w, c))
    y_flat.append(y_embed.reshape(b, h * w))
    x_flat.append(x_embed.reshape(b, h * w))
    lvl_flat.append(jnp.broadcast_to(level_embed[lvl], (h * w, c)))
    mask_flat.append(mask.reshape(b, h * w))
    ratios.append(valid_ratio(mask))
  # Every level's positions encoded at once (elementwise: the same numbers
  # as level by level).
  c = feats[0].shape[-1]
  pos = sine_encode(jnp.concatenate(y_flat, axis=1),
                    jnp.concatenate(x_flat, axis=1), num_feats=c // 2,
                    temperature=temperature)
  return MultiScaleInputs(
      feat_flatten=jnp.concatenate(feat_flat, axis=1),
      lvl_pos_embed_flatten=pos + jnp.concatenate(lvl_flat, axis=0)[None],
      mask_flatten=jnp.concatenate(mask_flat, axis=1),
      valid_ratios=jnp.stack(ratios, axis=1),
      spatial_shapes=spatial_shapes,
      level_start_index=tuple(starts))
