"""Feature-level padding masks, sine positional encoding and valid ratios.

Exactly as mmdet 3.3.0:
- masks: ``F.interpolate(mask[None].float(), size=(h, w))`` (nearest mode:
  source index = min(floor(dst * float32(in / out)), in - 1)), then bool;
- ``layers/positional_encoding.py`` ``SinePositionalEncoding`` (normalize=True);
- ``detectors/deformable_detr.py`` ``get_valid_ratio``.
All helpers are pure; masks are True on padding.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def nearest_source_indices(*, in_size: int, out_size: int) -> np.ndarray:
  """torch's nearest-neighbour source index for every output position.

  Returns (out_size,) int32 host constant: ``min(floor(dst * scale), in-1)``
  with ``scale = float32(in_size) / out_size`` computed in float32 (as
  ATen's ``nearest_idx``; equal sizes are the identity, 2x upsampling is
  ``dst >> 1``).
  """
  dst = np.arange(out_size)
  if out_size == in_size:
    return dst.astype(np.int32)
  if out_size == 2 * in_size:
    return (dst >> 1).astype(np.int32)
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1).astype(np.int32)


def interpolate_mask_nearest(mask: jax.Array, *, size: tuple[int, int]
                             ) -> jax.Array:
  """(B, H, W) bool padding mask -> (B, h, w) bool, torch nearest rule."""
  _, in_h, in_w = mask.shape
  out_h, out_w = int(size[0]), int(size[1])
  rows = nearest_source_indices(in_size=in_h, out_size=out_h)
  cols = nearest_source_indices(in_size=in_w, out_size=out_w)
  return jnp.asarray(mask)[:, rows][:, :, cols].astype(bool)


def sine_positional_encoding(mask: jax.Array, *, num_feats: int,
                             temperature: float = 10000.,
                             normalize: bool = True,
                             scale: float = 2 * math.pi,
                             eps: float = 1e-6,
                             offset: float = 0.) -> jax.Array:
  """mmdet SinePositionalEncoding from a padding mask.

  Args:
    mask: (B, h, w) bool, True = padding.
  Returns:
    (B, h, w, 2 * num_feats) float32, channels ordered (y part, x part),
    each part interleaved [sin(d0), cos(d1), sin(d2), ...].
  """
  y_embed, x_embed = sine_embed_coordinates(mask, normalize=normalize,
                                            scale=scale, eps=eps,
                                            offset=offset)
  return sine_encode(y_embed, x_embed, num_feats=num_feats,
                     temperature=temperature)


def sine_embed_coordinates(mask: jax.Array, *, normalize: bool = True,
                           scale: float = 2 * math.pi, eps: float = 1e-6,
                           offset: float = 0.) -> tuple[jax.Array, jax.Array]:
  """The (normalised) cumulative row / column counts of the valid pixels:
  (B, h, w) bool mask -> y_embed, x_embed, each (B, h, w) float32."""
  not_mask = 1.0 - jnp.asarray(mask).astype(jnp.float32)
  y_embed = jnp.cumsum(not_mask, axis=1)
  x_embed = jnp.cumsum(not_mask, axis=2)
  if normalize:
    y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
  return y_embed, x_embed


def sine_encode(y_embed: jax.Array, x_embed: jax.Array, *, num_feats: int,
                temperature: float = 10000.) -> jax.Array:
  """Elementwise: y_embed, x_embed (...) -> (..., 2 * num_feats), the y part
  then the x part, channel j sin (even j) or cos (odd j) of
  embed / temperature ** (2 * (j // 2) / num_feats).  Any leading shape, so
  every level's positions can be encoded at once."""
  dim_t = jnp.arange(num_feats, dtype=jnp.float32)
  dim_t = jnp.float32(temperature) ** (2 * (dim_t // 2) / num_feats)
  even = jnp.arange(num_feats) % 2 == 0

  def encode(e):
    p = e[..., None] / dim_t
    return jnp.where(even, jnp.sin(p), jnp.cos(p))
  return jnp.concatenate((encode(y_embed), encode(x_embed)), axis=-1)


def valid_ratio(mask: jax.Array) -> jax.Array:
  """deformable_detr.get_valid_ratio: (B, h, w) bool -> (B, 2) as (r_w, r_h).

  r_h = #valid rows in column 0 / h, r_w = #valid columns in row 0 / w.
  """
  mask = jnp.asarray(mask)
  _, h, w = mask.shape
  valid_h = jnp.sum(~mask[:, :, 0], axis=1).astype(jnp.float32)
  valid_w = jnp.sum(~mask[:, 0, :], axis=1).astype(jnp.float32)
  return jnp.stack([valid_w / w, valid_h / h], axis=-1)
