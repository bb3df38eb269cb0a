"""Two-stage encoder proposals: mmdet DeformableDETR.gen_encoder_output_proposals
without its two learned layers (the detector applies memory_trans_fc and
memory_trans_norm, LayerNorm eps 1e-5, to the returned memory).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.ops.xla_cpu import exact_divide


def gen_encoder_output_proposals(
    memory: jnp.ndarray, *, memory_mask: Optional[jnp.ndarray],
    spatial_shapes: Sequence[Sequence[int]]
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """One proposal per encoder position: the pixel centre, wh 0.05 * 2**lvl.

  Args:
    memory: (B, N, C) encoder output, N = sum(h * w).
    memory_mask: (B, N) bool, True = padding; None = no padding.
    spatial_shapes: static tuple of (h, w) per level.

  Returns:
    output_memory: (B, N, C) memory zeroed at padded and invalid positions
      (before memory_trans_fc / memory_trans_norm).
    output_proposals: (B, N, 4) inverse-sigmoid cxcywh, +inf at padded
      positions and where any coordinate is outside (0.01, 0.99).
  """
  b = memory.shape[0]
  proposals = []
  cur = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    h, w = int(h), int(w)
    if memory_mask is not None:
      mask_l = memory_mask[:, cur:cur + h * w].reshape(b, h, w)
      valid_h = jnp.sum(~mask_l[:, :, 0], 1).astype(jnp.float32)
      valid_w = jnp.sum(~mask_l[:, 0, :], 1).astype(jnp.float32)
      scale = jnp.stack([valid_w, valid_h], -1).reshape(b, 1, 1, 2)
    grid_y, grid_x = np.meshgrid(np.arange(h, dtype=np.float32),
                                 np.arange(w, dtype=np.float32), indexing='ij')
    grid = np.stack([grid_x, grid_y], -1)[None] + np.float32(0.5)
    if memory_mask is not None:
      grid = exact_divide(jnp.asarray(grid), scale)  # (B, h, w, 2)
    else:  # static sizes: numpy divides exactly, at trace time
      grid = jnp.asarray(grid / np.asarray([w, h], np.float32))
    grid = jnp.broadcast_to(grid, (b, h, w, 2))
    wh = jnp.full_like(grid, np.float32(0.05) * np.float32(2.0 ** lvl))
    proposals.append(jnp.concatenate([grid, wh], -1).reshape(b, h * w, 4))
    cur += h * w
  output_proposals = jnp.concatenate(proposals, 1)
  valid = jnp.all((output_proposals > 0.01) & (output_proposals < 0.99), -1,
                  keepdims=True)
  output_proposals = jnp.log(output_proposals / (1 - output_proposals))
  invalid = ~valid
  if memory_mask is not None:
    invalid = invalid | memory_mask[..., None]
  output_proposals = jnp.where(invalid, jnp.inf, output_proposals)
  output_memory = jnp.where(invalid, 0.0, memory).astype(memory.dtype)
  return output_memory, output_proposals
