"""Denoising (CDN) targets and losses (mmdet ``DINOHead.loss_dn``), static shapes.

Slot layout (the reference's): the used denoising queries are a prefix of
the D static slots, ``num_groups`` groups of ``2 * M`` slots each, where M is
the batch's largest gt count; in group ``g`` image ``i``'s positive query for
its ``t``-th gt (t < n_i) sits at ``g * 2M + t`` and its negative at
``g * 2M + M + t``.  ``num_groups = max(num_dn_queries // M, 1)`` (1 when
M == 0) unless given.  The ``t``-th gt is the ``t``-th *valid* gt slot.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ddq_jax.ops import boxes as box_ops
from ddq_jax.losses.dense_aux import (F32_EPS, as_gt_arrays, reduce_mean,
                                      sigmoid_focal_elementwise)


def dn_num_groups(gt_valid, *, num_dn_queries: int):
  """CdnQueryGenerator.get_num_groups (dynamic): gt_valid (B, G) -> () int32."""
  m = jnp.max(jnp.sum(gt_valid, -1))
  return jnp.maximum(num_dn_queries // jnp.maximum(m, 1), 1).astype(jnp.int32)


def dn_targets(*, num_slots: int, gt_valid, num_groups):
  """Per-slot targets of the denoising part.

  Args: num_slots: static D; gt_valid (B, G) bool; num_groups () int.
  Returns: gt_index (B, D) int32 index into the G gt slots (valid only where
    ``positive``), positive (B, D) bool, slot_valid (B, D) bool (the
    reference's ``num_denoising_queries`` prefix: label weight 1).
  """
  b, g = gt_valid.shape
  n = jnp.sum(gt_valid, -1).astype(jnp.int32)                 # (B,)
  m = jnp.max(n)
  group = 2 * m
  j = jnp.arange(num_slots, dtype=jnp.int32)
  r = j % jnp.maximum(group, 1)
  slot_valid = j < num_groups * group                         # (D,)
  positive = slot_valid[None, :] & (r[None, :] < n[:, None])  # (B, D)
  # rank -> gt slot: the t-th valid gt.
  order = jnp.argsort(~gt_valid, axis=-1, stable=True).astype(jnp.int32)
  t = jnp.minimum(r, g - 1)
  gt_index = jnp.take_along_axis(order, jnp.broadcast_to(t, (b, num_slots)),
                                 axis=-1)
  return gt_index, positive, jnp.broadcast_to(slot_valid, (b, num_slots))


def box_losses(pred_cxcywh, tgt_cxcywh, pos, *, img_shapes, avg, l1_weight,
               iou_weight):
  """L1 (normalised cxcywh) and GIoU (pixels) over positives, / (avg + eps).

  pred_cxcywh, tgt_cxcywh (..., B, Q, 4); pos (..., B, Q) bool;
  img_shapes (B, 2) (h, w); avg (...) the clamped number of positives.
  """
  h = img_shapes[:, 0].astype(pred_cxcywh.dtype)
  w = img_shapes[:, 1].astype(pred_cxcywh.dtype)
  factor = jnp.stack([w, h, w, h], -1)[:, None, :]
  posf = pos.astype(pred_cxcywh.dtype)
  l1 = jnp.sum(jnp.abs(pred_cxcywh - tgt_cxcywh) * posf[..., None],
               (-3, -2, -1))
  pred_px = box_ops.cxcywh_to_xyxy(pred_cxcywh) * factor
  tgt_px = box_ops.cxcywh_to_xyxy(tgt_cxcywh) * factor
  tgt_px = jnp.where(pos[..., None], tgt_px, jax.lax.stop_gradient(pred_px))
  giou = box_ops.aligned_giou(pred_px, tgt_px, eps=1e-6)
  gl = jnp.sum(jnp.where(pos, 1 - giou, 0.0), (-2, -1))
  return (l1 * l1_weight / (avg + F32_EPS), gl * iou_weight / (avg + F32_EPS))


def dn_loss(dn_cls_scores, dn_bbox_preds, *, gt_boxes, gt_labels, gt_valid,
            img_shapes, num_dn_queries: int, num_groups=None,
            focal_alpha=0.25, focal_gamma=2.0, cls_weight=1.0,
            l1_weight=5.0, iou_weight=2.0,
            axis_name: Optional[str] = None):
  """Denoising losses of every decoder layer.

  Args:
    dn_cls_scores: (L, B, D, K) logits of the D static denoising slots.
    dn_bbox_preds: (L, B, D, 4) sigmoid cxcywh.
    gt_boxes (B, G, 4) xyxy px; gt_labels (B, G); gt_valid (B, G);
    img_shapes (B, 2) (h, w); num_dn_queries: the config's (static);
    num_groups: () int, default computed from gt_valid like the reference.
  Returns: (loss_cls, loss_bbox, loss_iou), each (L,).
  """
  gt_boxes, gt_labels, gt_valid, img_shapes = as_gt_arrays(
      gt_boxes, gt_labels, gt_valid, img_shapes)
  k = dn_cls_scores.shape[-1]
  d = dn_cls_scores.shape[-2]
  if num_groups is None:
    num_groups = dn_num_groups(gt_valid, num_dn_queries=num_dn_queries)
  gt_index, pos, slot_valid = dn_targets(num_slots=d, gt_valid=gt_valid,
                                         num_groups=num_groups)
  b_idx = jnp.arange(gt_boxes.shape[0])[:, None]
  labels = jnp.where(pos, gt_labels[b_idx, gt_index], k)
  onehot = jax.nn.one_hot(labels, k, dtype=dn_cls_scores.dtype)
  fl = sigmoid_focal_elementwise(dn_cls_scores, onehot, alpha=focal_alpha,
                                 gamma=focal_gamma)
  fl = jnp.sum(jnp.where(slot_valid[..., None], fl, 0.0), (-3, -2, -1))
  num_pos = jnp.sum(pos).astype(dn_cls_scores.dtype)
  cls_avg = jnp.maximum(reduce_mean(num_pos, axis_name), 1.0)
  loss_cls = fl * cls_weight / (cls_avg + F32_EPS)
  h = img_shapes[:, 0].astype(gt_boxes.dtype)
  w = img_shapes[:, 1].astype(gt_boxes.dtype)
  factor = jnp.stack([w, h, w, h], -1)[:, None, :]
  tgt = box_ops.xyxy_to_cxcywh(gt_boxes[b_idx, gt_index] / factor)
  tgt = jnp.where(pos[..., None], tgt, 0.0)
  loss_bbox, loss_iou = box_losses(dn_bbox_preds, tgt, pos,
                                   img_shapes=img_shapes, avg=cls_avg,
                                   l1_weight=l1_weight, iou_weight=iou_weight)
  return loss_cls, loss_bbox, loss_iou
