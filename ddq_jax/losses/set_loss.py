"""One-to-one set losses: ``DETRHead.loss_by_feat_single`` given an
assignment, and the Hungarian matching cost of DINO / DDQ.

Used by the distinct queries of every decoder layer, the encoder proposals
(``enc_loss_*``) and the denoising queries (``dn_loss.py``, whose
assignment is fixed by the slot layout).  Static shapes: queries that do
not exist for the loss are masked (``query_mask``), never indexed out.

Averaging, as mmdet: focal loss summed over existing queries, L1 on
normalised cxcywh and GIoU on pixel boxes over positives, each divided by
``avg_factor(num positives)`` (mean over devices, clamped at 1) + eps.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ddq_jax.losses import basic
from ddq_jax.losses import match_costs as mc
from ddq_jax.ops import boxes as box_ops


def distinct_match_cost(cls_logits, bbox_preds, *, gt_boxes, gt_labels,
                        gt_valid, img_shapes, cfg):
  """HungarianAssigner cost of DINO/DDQ: FocalLossCost + BBoxL1Cost (xywh,
  normalised) + IoUCost(giou), weights ``cfg.match_*``.
  (..., B, Q, K), (..., B, Q, 4) sigmoid cxcywh -> (..., B, Q, G)."""
  gt_boxes, gt_labels, gt_valid, img_shapes = basic.as_gt_arrays(
      gt_boxes, gt_labels, gt_valid, img_shapes)
  labels = jnp.where(gt_valid, gt_labels, 0).astype(jnp.int32)

  def one(c, bx, gb, gl, hw):
    return mc.hungarian_cost(
        cls_logits=c, boxes_cxcywh_norm=bx, gt_labels=gl, gt_boxes_xyxy=gb,
        img_hw=hw, box_format='xywh', cls_weight=cfg.match_cls_weight,
        l1_weight=cfg.match_bbox_weight, iou_weight=cfg.match_iou_weight,
        alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
  return mc.batched_cost(one, (cls_logits, bbox_preds), (gt_boxes, labels),
                         img_shapes=img_shapes)


def box_losses(pred_cxcywh, tgt_cxcywh, pos, *, img_shapes, avg, l1_weight,
               iou_weight):
  """L1 (normalised cxcywh) and GIoU (pixels) over positives, reduced by
  the average factor ``avg``.

  pred_cxcywh, tgt_cxcywh (..., B, Q, 4); pos (..., B, Q) bool;
  img_shapes (B, 2) (h, w); avg (...) the clamped number of positives.
  Returns (loss_bbox, loss_iou), each (...).
  """
  posf = pos.astype(pred_cxcywh.dtype)
  l1 = jnp.sum(basic.l1_loss(pred_cxcywh, tgt_cxcywh, weight=posf),
               (-3, -2, -1))
  factor = box_ops.image_size_factor(img_shapes, pred_cxcywh.dtype)[:, None]
  pred_px = box_ops.cxcywh_to_xyxy(pred_cxcywh) * factor
  tgt_px = box_ops.cxcywh_to_xyxy(tgt_cxcywh) * factor
  tgt_px = jnp.where(pos[..., None], tgt_px, jax.lax.stop_gradient(pred_px))
  giou = jnp.sum(jnp.where(pos, basic.giou_loss(pred_px, tgt_px), 0.0),
                 (-2, -1))
  return (basic.reduce_with_avg_factor(l1 * l1_weight, avg),
          basic.reduce_with_avg_factor(giou * iou_weight, avg))


def set_loss(cls_logits, bbox_preds, assigned, *, query_mask, gt_boxes,
             gt_labels, img_shapes, cfg, axis_name: Optional[str] = None):
  """``loss_by_feat_single`` given an assignment.

  Args:
    cls_logits (..., B, Q, K), bbox_preds (..., B, Q, 4) sigmoid cxcywh;
    assigned (..., B, Q) int gt slot per query, -1 = background;
    query_mask (..., B, Q) bool: queries that exist for the loss.
    cfg: ``CriterionConfig`` (focal alpha / gamma, term weights).
  Returns: (loss_cls, loss_bbox, loss_iou), each of shape (...).
  """
  gt_boxes, gt_labels, _, img_shapes = basic.as_gt_arrays(
      gt_boxes, gt_labels, False, img_shapes)
  k = cls_logits.shape[-1]
  pos = (assigned >= 0) & query_mask
  safe = jnp.maximum(assigned, 0)
  b_idx = jnp.arange(gt_boxes.shape[0])[:, None]
  labels = jnp.where(pos, gt_labels[b_idx, safe], k)
  fl = basic.sigmoid_focal_loss(
      cls_logits, basic.labels_to_onehot(labels, k, cls_logits.dtype),
      alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
  fl = jnp.sum(jnp.where(query_mask[..., None], fl, 0.0), (-3, -2, -1))
  avg = basic.avg_factor(jnp.sum(pos, (-2, -1)), axis_name=axis_name)
  loss_cls = basic.reduce_with_avg_factor(fl * cfg.cls_weight, avg)
  factor = box_ops.image_size_factor(img_shapes, gt_boxes.dtype)[:, None]
  tgt = box_ops.xyxy_to_cxcywh(gt_boxes[b_idx, safe] / factor)
  tgt = jnp.where(pos[..., None], tgt, 0.0)
  loss_bbox, loss_iou = box_losses(bbox_preds, tgt, pos,
                                   img_shapes=img_shapes, avg=avg,
                                   l1_weight=cfg.bbox_weight,
                                   iou_weight=cfg.iou_weight)
  return loss_cls, loss_bbox, loss_iou
