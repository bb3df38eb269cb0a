"""Box conversions and overlaps.  Pure functions, any leading batch dims.

Boxes are float arrays whose last axis has 4 entries: ``cxcywh`` (centre,
width, height) or ``xyxy`` (corners).
"""
from __future__ import annotations

import jax.numpy as jnp

from ddq_jax.ops.xla_cpu import coordinate_extents


def cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """(..., 4) cxcywh -> (..., 4) xyxy, as mmdet's ``bbox_cxcywh_to_xyxy``."""
  cx, cy, w, h = jnp.split(boxes, 4, axis=-1)
  return jnp.concatenate([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w,
                          cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
  """(..., 4) xyxy -> (..., 4) cxcywh, as mmdet's ``bbox_xyxy_to_cxcywh``."""
  x1, y1, x2, y2 = jnp.split(boxes, 4, axis=-1)
  return jnp.concatenate([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1],
                         axis=-1)


def image_size_factor(img_hw: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
  """(..., 2) (h, w) -> (..., 4) [w, h, w, h]: the reference's ``factor``
  that maps normalised boxes to ``img_shape`` pixels."""
  img_hw = jnp.asarray(img_hw).astype(dtype)
  h, w = img_hw[..., 0], img_hw[..., 1]
  return jnp.stack([w, h, w, h], -1)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """(..., 4) xyxy -> (...) area (negative extents are not clamped)."""
  return jnp.prod(coordinate_extents(boxes), -1)


_IS_LO = (True, True, False, False)


def clamp(x: jnp.ndarray, *, lo=None, hi=None) -> jnp.ndarray:
  """torch's ``x.clamp(min=lo, max=hi)``, gradient included: 1 on the
  closed interval, bounds too (``jnp.clip`` gives 1/2 at a bound)."""
  inside = jnp.ones(x.shape, bool)
  if lo is not None:
    inside &= x >= lo
  if hi is not None:
    inside &= x <= hi
  return jnp.where(inside, x, jnp.clip(x, lo, hi))


def _overlaps(boxes1, boxes2, *, giou: bool, eps: float):
  """IoU or GIoU of boxes that broadcast against each other: (..., 4)."""
  area1, area2 = box_area(boxes1), box_area(boxes2)
  lo = jnp.asarray(_IS_LO)
  hi, low = jnp.maximum(boxes1, boxes2), jnp.minimum(boxes1, boxes2)
  wh = clamp(coordinate_extents(jnp.where(lo, hi, low)), lo=0)
  overlap = jnp.prod(wh, -1)
  union = jnp.maximum(area1 + area2 - overlap, eps)
  ious = overlap / union
  if not giou:
    return ious
  enclose_wh = clamp(coordinate_extents(jnp.where(lo, low, hi)), lo=0)
  enclose_area = jnp.maximum(jnp.prod(enclose_wh, -1), eps)
  return ious - (enclose_area - union) / enclose_area


def pairwise_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, *,
                 eps: float = 1e-6) -> jnp.ndarray:
  """IoU of every pair: (..., N, 4) x (..., M, 4) xyxy -> (..., N, M).

  Same arithmetic as mmdet's ``bbox_overlaps(mode='iou')`` (union clamped
  to ``eps``).
  """
  return _overlaps(boxes1[..., :, None, :], boxes2[..., None, :, :],
                   giou=False, eps=eps)


def pairwise_giou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, *,
                  eps: float = 1e-6) -> jnp.ndarray:
  """Generalised IoU of every pair, (..., N, 4) x (..., M, 4) -> (..., N, M).

  Same arithmetic as mmdet's ``bbox_overlaps(mode='giou')``.
  """
  return _overlaps(boxes1[..., :, None, :], boxes2[..., None, :, :],
                   giou=True, eps=eps)


def aligned_giou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, *,
                 eps: float = 1e-6) -> jnp.ndarray:
  """GIoU of matched pairs: (..., 4) x (..., 4) -> (...), as mmdet's
  ``bbox_overlaps(mode='giou', is_aligned=True)``."""
  return _overlaps(boxes1, boxes2, giou=True, eps=eps)


def inverse_sigmoid(x: jnp.ndarray, *, eps: float = 1e-5) -> jnp.ndarray:
  """mmdet's ``inverse_sigmoid``: log(x1 / x2) with x clamped to [0, 1] and
  both terms clamped below by ``eps`` (1e-5 in the head, 1e-3 in the
  decoder's refinement and the denoising boxes)."""
  x = clamp(x, lo=0, hi=1)
  x1 = clamp(x, lo=eps)
  x2 = clamp(1 - x, lo=eps)
  return jnp.log(x1 / x2)
