"""Multi-scale deformable attention: the sampling core, as a pure function.

Equal to mmcv 2.1.0's ``multi_scale_deformable_attn_pytorch``: per level,
``F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``
of the value map at the sampling locations, weighted by the attention weights
and summed over levels and points.

Implementation: one gather over the flattened multi-level value sequence.
For every sample the four bilinear corners are turned into flat indices into
``N = sum(h * w)`` (level start offset + y * w + x); corners outside their
level's map get weight 0 (and a clipped, harmless index), which is exactly
grid_sample's zero padding.  The corner weights are folded with the attention
weights before the gather, so the output is a single weighted sum over
``L * P * 4`` gathered rows per (batch, head, query).

Speed notes: the gather moves ``B * H * Q * L * P * 4 * Dh`` floats; the
weighted reduction is a batched dot at HIGHEST precision (float32, no TF32
on GPU).  On XLA:CPU writing those gathered rows is the cost (an R50
encoder layer's are 1.46 GB, and a plain copy of that size takes as long),
so the queries go in blocks (``backend.deform_attn_query_chunks``) whose
rows stay in cache: per R50 encoder layer on the 2-core host, forward
0.80 -> 0.52 s, forward and backward 1.8 -> 1.0 s.  Keep the result in
(B, H, Q, Dh) order: see the comment at the reduction.  Tried without gain
on XLA:CPU: one gather over a flattened (B * H * N) value, gathering the
two x-neighbours as one 2-row slice, an optimization barrier between the
corner arithmetic and the gather.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax import backend


def _level_constants(spatial_shapes: Sequence[Sequence[int]]):
  """Per-level numpy constants: heights, widths, start offsets, each (L,)."""
  shapes = np.asarray([(int(h), int(w)) for h, w in spatial_shapes], np.int64)
  heights, widths = shapes[:, 0], shapes[:, 1]
  starts = np.concatenate([[0], np.cumsum(heights * widths)[:-1]])
  return heights, widths, starts


def _corners(sampling_locations: jnp.ndarray, attention_weights: jnp.ndarray,
             *, spatial_shapes: Sequence[Sequence[int]], dtype):
  """Flat corner indices and folded weights of every bilinear sample.

  sampling_locations (B, Q, H, L, P, 2), attention_weights (B, Q, H, L, P)
  -> idx (B, H, Q * K) int32, wts (B, H, Q, K) in ``dtype``, K = L * P * 4.
  Corners outside their level's map get weight 0 (grid_sample's zeros).
  """
  b, q, num_heads, num_levels, num_points, _ = sampling_locations.shape
  heights, widths, starts = _level_constants(spatial_shapes)
  assert len(heights) == num_levels, (spatial_shapes, num_levels)
  ldtype = sampling_locations.dtype
  lshape = (num_levels, 1)  # broadcasts against (..., L, P)
  h_f = jnp.asarray(heights.reshape(lshape), ldtype)
  w_f = jnp.asarray(widths.reshape(lshape), ldtype)
  h_i = jnp.asarray(heights.reshape(lshape), jnp.int32)
  w_i = jnp.asarray(widths.reshape(lshape), jnp.int32)
  start_i = jnp.asarray(starts.reshape(lshape), jnp.int32)

  # Work in (B, H, Q, L, P) order so the gather result needs no transpose.
  loc = sampling_locations.transpose(0, 2, 1, 3, 4, 5)
  attn = attention_weights.transpose(0, 2, 1, 3, 4)
  # grid_sample's unnormalisation (align_corners=False) of grid = 2 * loc - 1,
  # in the float32 operations of its CPU kernel: (grid + 1) * (size / 2) - 0.5.
  grid = 2 * loc - 1
  x = (grid[..., 0] + 1) * (w_f / 2) - 0.5  # (B, H, Q, L, P)
  y = (grid[..., 1] + 1) * (h_f / 2) - 0.5
  x0f = jax.lax.stop_gradient(jnp.floor(x))
  y0f = jax.lax.stop_gradient(jnp.floor(y))
  fx = x - x0f
  fy = y - y0f
  x0 = x0f.astype(jnp.int32)
  y0 = y0f.astype(jnp.int32)

  idx, wts = [], []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      valid = (xi >= 0) & (xi < w_i) & (yi >= 0) & (yi < h_i)
      flat = start_i + jnp.clip(yi, 0, h_i - 1) * w_i + jnp.clip(xi, 0, w_i - 1)
      idx.append(flat)
      wts.append(jnp.where(valid, wy * wx, 0) * attn)
  k = num_levels * num_points * 4
  idx = jnp.stack(idx, -1).reshape(b, num_heads, q * k)
  wts = jnp.stack(wts, -1).reshape(b, num_heads, q, k).astype(dtype)
  return idx, wts


def _gather_rows(v: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
  """v (B, H, N, Dh), idx (B, H, M) -> (B, H, M, Dh)."""
  return jax.vmap(jax.vmap(
      lambda vv, ii: jnp.take(vv, ii, axis=0, mode='clip')))(v, idx)


def _weighted_sum(wts: jnp.ndarray, sampled: jnp.ndarray) -> jnp.ndarray:
  """wts (B, H, Q, K), sampled (B, H, Q, K, Dh) -> (B, H, Q, Dh).

  A batched (1, K) x (K, Dh) product: this operand order and a (B, H, Q, Dh)
  result need no transpose of the big gathered array (an output in
  (B, Q, H, Dh) order made XLA CPU fuse gather + index arithmetic into a
  transposing copy, ~3x slower).  HIGHEST keeps float32 (no TF32 on GPU)."""
  return jax.lax.dot_general(
      wts, sampled, (((3,), (3,)), ((0, 1, 2), (0, 1, 2))),
      precision=jax.lax.Precision.HIGHEST)


def _sample(value, sampling_locations, attention_weights, spatial_shapes):
  """The forward computation; (B, H, Q, Dh)."""
  b, n, num_heads, dh = value.shape
  q = sampling_locations.shape[1]
  heights, widths, _ = _level_constants(spatial_shapes)
  assert int((heights * widths).sum()) == n, (spatial_shapes, n)
  idx, wts = _corners(sampling_locations, attention_weights,
                      spatial_shapes=spatial_shapes, dtype=value.dtype)
  v = value.transpose(0, 2, 1, 3)  # (B, H, N, Dh)
  sampled = _gather_rows(v, idx).reshape(b, num_heads, q, -1, dh)
  return _weighted_sum(wts, sampled)


def _query_blocks(x, chunks: int, axis: int):
  """x split along ``axis`` (queries) into ``chunks`` equal blocks, stacked
  first; the last block is zero-padded (zero attention weights, so padded
  queries add nothing and their results are dropped)."""
  q = x.shape[axis]
  size = -(-q // chunks)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, chunks * size - q)
  x = jnp.pad(x, pad)
  x = x.reshape(x.shape[:axis] + (chunks, size) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unblock(x, axis: int, q: int):
  """Inverse of ``_query_blocks`` for a result stacked first with its
  query block at ``axis`` (counted without the stacking axis)."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, q, axis=axis)


def _sample_blocked(value, loc, attn, spatial_shapes, chunks):
  """``_sample`` over ``chunks`` query blocks in sequence (``lax.map``):
  only one block's gathered samples exist at a time.  Each query's result
  is computed exactly as unblocked."""
  if chunks <= 1:
    return _sample(value, loc, attn, spatial_shapes)
  q = loc.shape[1]
  out = jax.lax.map(lambda la: _sample(value, la[0], la[1], spatial_shapes),
                    (_query_blocks(loc, chunks, 1),
                     _query_blocks(attn, chunks, 1)))  # (C, B, H, q', Dh)
  return _unblock(out, 2, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sample_vjp(value, sampling_locations, attention_weights, spatial_shapes,
                chunks):
  return _sample_blocked(value, sampling_locations, attention_weights,
                         spatial_shapes, chunks)


def _sample_fwd(value, sampling_locations, attention_weights, spatial_shapes,
                chunks):
  out = _sample_blocked(value, sampling_locations, attention_weights,
                        spatial_shapes, chunks)
  # Residuals: the inputs only; corners and gathers are recomputed.
  return out, (value, sampling_locations, attention_weights)


def _bwd_core(spatial_shapes, value, loc, attn, g, d_v=None):
  """The backward of one query set; its value cotangent ((B, H, N, Dh), in
  at least float32: many samples land on one row) added to ``d_v``, or
  alone when ``d_v`` is None."""
  b, n, num_heads, dh = value.shape
  q = loc.shape[1]
  (idx, wts), corners_vjp = jax.vjp(
      lambda l, a: _corners(l, a, spatial_shapes=spatial_shapes,
                            dtype=value.dtype), loc, attn)
  v = value.transpose(0, 2, 1, 3)  # (B, H, N, Dh)
  g = g.astype(value.dtype)
  sampled = _gather_rows(v, idx).reshape(b, num_heads, q, -1, dh)
  d_wts = jax.lax.dot_general(
      sampled, g, (((4,), (3,)), ((0, 1, 2), (0, 1, 2))),
      precision=jax.lax.Precision.HIGHEST)  # (B, H, Q, K)
  k = wts.shape[-1]
  contrib = (wts[..., None] * g[:, :, :, None, :]).reshape(
      b, num_heads, q * k, dh)
  acc = jnp.promote_types(value.dtype, jnp.float32)
  if d_v is None:
    d_v = jax.vmap(jax.vmap(
        lambda ii, cc: jnp.zeros((n, dh), acc).at[ii].add(
            cc.astype(acc), mode='clip')))(idx, contrib)  # (B, H, N, Dh)
  else:
    d_v = jax.vmap(jax.vmap(
        lambda dd, ii, cc: dd.at[ii].add(cc.astype(acc), mode='clip')))(
            d_v, idx, contrib)
  d_idx = np.zeros(idx.shape, jax.dtypes.float0)
  d_loc, d_attn = corners_vjp((d_idx, d_wts.astype(wts.dtype)))
  return d_v, d_loc, d_attn


def _sample_bwd(spatial_shapes, chunks, res, g):
  """g (B, H, Q, Dh) -> cotangents of (value, locations, weights).

  out[b,h,q] = sum_k wts[b,h,q,k] * v[b,h,idx[b,h,q,k]], so
  d v = scatter-add of wts * g at idx, d wts[k] = <g, v[idx[k]]>, and the
  locations / attention weights get d wts through the (small) corner-weight
  function's own VJP.  With ``chunks`` > 1 the query blocks run in sequence
  (``lax.scan``), adding into one value cotangent."""
  value, loc, attn = res
  b, n, num_heads, dh = value.shape
  if chunks <= 1:
    d_v, d_loc, d_attn = _bwd_core(spatial_shapes, value, loc, attn, g)
  else:
    zeros = jnp.zeros((b, num_heads, n, dh),
                      jnp.promote_types(value.dtype, jnp.float32))
    q = loc.shape[1]

    def body(d_v, xs):
      d_v, d_l, d_a = _bwd_core(spatial_shapes, value, *xs, d_v)
      return d_v, (d_l, d_a)
    d_v, (d_loc, d_attn) = jax.lax.scan(
        body, zeros, (_query_blocks(loc, chunks, 1),
                      _query_blocks(attn, chunks, 1),
                      _query_blocks(g, chunks, 2)))
    d_loc, d_attn = _unblock(d_loc, 1, q), _unblock(d_attn, 1, q)
  return d_v.astype(value.dtype).transpose(0, 2, 1, 3), d_loc, d_attn


_sample_vjp.defvjp(_sample_fwd, _sample_bwd)


def multi_scale_deformable_attention(
    value: jnp.ndarray, *, spatial_shapes: Sequence[Sequence[int]],
    sampling_locations: jnp.ndarray,
    attention_weights: jnp.ndarray,
    custom_vjp: bool = True,
    query_chunks: int | None = None) -> jnp.ndarray:
  """Bilinear multi-scale deformable sampling + attention-weighted sum.

  Args:
    value: (B, N, H, Dh), N = sum(h * w) over levels, each level row-major.
    spatial_shapes: static tuple of (h, w) per level, length L.
    sampling_locations: (B, Q, H, L, P, 2) normalised (x, y), 0..1 spans
      the level's map (values outside are allowed; they read zeros).
    attention_weights: (B, Q, H, L, P).
    custom_vjp: True: the backward pass keeps only these inputs and
      recomputes corners and gathers (memory: nothing of size
      B * H * Q * L * P * 4 survives the forward pass); False: plain
      autodiff (keeps the gathered samples), for tests.
    query_chunks: with custom_vjp, the queries are sampled in this many
      blocks in sequence, forward and backward, so only one block's
      gathered samples (``B * H * Q * L * P * 4 * Dh`` floats in all) are
      alive at a time; None: ``backend.deform_attn_query_chunks(Q)``.

  Returns:
    (B, Q, H * Dh), channel index = head * Dh + d (as mmcv).
  """
  b, q = sampling_locations.shape[:2]
  num_heads, dh = value.shape[2:]
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  if custom_vjp:
    chunks = (backend.deform_attn_query_chunks(q) if query_chunks is None
              else int(query_chunks))
    out = _sample_vjp(value, sampling_locations, attention_weights, shapes,
                      max(1, min(chunks, q)))
  else:
    out = _sample(value, sampling_locations, attention_weights, shapes)
  return out.transpose(0, 2, 1, 3).reshape(b, q, num_heads * dh)
