"""Per-image valid extents at every feature resolution: padding invariance.

The reference's published numbers come from batch 1 with no padding: each
feature map is exactly as large as the unpadded conv arithmetic makes it.
On a padded canvas (image top-left, padding bottom / right) the same values
appear in the top-left ``extent`` block of each map when

* every layer that mixes space sees 0 outside the image's own extent at its
  resolution, as torch's zero padding does (``zero_outside``);
* the extent at stride ``s`` is ``ceil(h / s)``: the output size of every
  ResNet stride-2 layer (7x7 pad 3, 3x3 pad 1, max-pool 3 pad 1, 1x1 stride
  2) is ``ceil(in / 2)``, and repeated ceil-halving is ``ceil(h / 2**k)``
  (``extent_valid``).

The transformer's level masks are built from the same extents (not from a
nearest-neighbour resize of the image mask, which differs when a stride does
not divide the canvas).  All helpers are pure and static-shape.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def image_extents(pad_mask: jax.Array) -> jax.Array:
  """(B, H, W) bool padding mask (True = padding, image top-left) ->
  (B, 2) int32 (h, w) of each image, at least 1 (a fully padded sample
  then behaves like a 1x1 image instead of dividing by zero)."""
  pad_mask = jnp.asarray(pad_mask)
  h = jnp.sum(~pad_mask[:, :, 0], axis=1)
  w = jnp.sum(~pad_mask[:, 0, :], axis=1)
  return jnp.maximum(jnp.stack([h, w], -1), 1).astype(jnp.int32)


def extent_at_stride(extents: jax.Array, *, stride: int) -> jax.Array:
  """(B, 2) image (h, w) -> (B, 2) ceil((h, w) / stride): the unpadded map
  size at that stride.

  ``lax.div`` truncates, which is the floor here (extents >= 0), and has
  no sign fix-up (``//`` has one, with a ``rem`` that jax2onnx cannot
  lower on a symbolic batch).  ``h - (1 - s)`` is ``h + (s - 1)`` written
  as a subtraction: jax2onnx rewrites a division of a sum by 2 into ONNX
  ``Mean``, which has no integer kernel."""
  s = int(stride)
  extents = jnp.asarray(extents, jnp.int32)
  return jax.lax.div(extents - jnp.int32(1 - s), jnp.int32(s))


def extent_valid(extents: jax.Array, *, stride: int,
                 shape: Sequence[int]) -> jax.Array:
  """(B, 2) image (h, w) -> (B, h_s, w_s) bool, True inside the image's
  extent at ``stride`` on a map of static ``shape`` (h_s, w_s)."""
  ext = extent_at_stride(extents, stride=stride)
  hs, ws = int(shape[0]), int(shape[1])
  rows = jnp.arange(hs, dtype=jnp.int32)[None, :, None] < ext[:, 0, None, None]
  cols = jnp.arange(ws, dtype=jnp.int32)[None, None, :] < ext[:, 1, None, None]
  return rows & cols


def zero_outside(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """x (B, h, w, C) with 0 where ``valid`` (B, h, w) is False; identity when
  ``valid`` is None (the reference's batched padding)."""
  if valid is None:
    return x
  return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
