"""DDQ's dense auxiliary loss (mmdet ``DDQAuxLoss`` + ``TopkHungarianAssigner``).

Static shapes throughout: B images, N dense queries, G ground-truth slots
(``gt_valid`` marks the real ones), K classes, ``topk`` = ``aux_num_pos``.

Reference semantics reproduced (mmdet 3.3.0):
- assignment on detached inputs; cost = ``match_costs.hungarian_cost`` with
  FocalLossCost applied to the *probabilities* (the reference sigmoids them
  a second time) + BBoxL1Cost (xyxy, normalised by img_shape) +
  IoUCost(giou); weights from config ``loss.match_*`` (2 / 5 / 2);
- 1-to-k Hungarian: every gt repeated ``k = min(aux_num_pos, N // num_gt)``
  times (num_gt per image), column ``g * k + r`` -> gt ``g``;
- alignment metric ``score[label]^alpha * IoU^beta`` (detached), normalised
  per gt: ``m / (max m + 1e-7) * max IoU`` over that gt's positives;
- quality focal loss (beta 2, on probabilities, label weight 1 for every
  query of an image with gt, 0 otherwise) + 2 * GIoU weighted by the metric;
  both divided by ``clamp(reduce_mean(sum of metrics), 1)``; the per-image
  terms are summed over images (as mmengine's ``parse_losses`` does).

Elementary pieces: ddq_jax/losses/basic.py, match_costs.py, hungarian.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.losses import basic
from ddq_jax.losses import match_costs as mc
from ddq_jax.losses.hungarian import hungarian_match_batched
from ddq_jax.ops import boxes as box_ops
from ddq_jax.ops.indexing import div_nonneg, take_along_axis_in_range


def _int_pow(x, e):
  """x ** e with an integer exponent as repeated products (torch's pow with
  an int exponent; much faster than exp/log pow on XLA:CPU)."""
  return x ** int(e) if float(e).is_integer() else x ** e


def qfl_prob_rows(probs, labels, scores, *, beta=2.0):
  """mmdet ``quality_focal_loss_with_prob`` per row: probs (..., K),
  labels (...) (K = background), scores (...) -> (...)."""
  k = probs.shape[-1]
  out = basic.quality_focal_loss(probs.reshape(-1, k), labels.reshape(-1),
                                 scores.reshape(-1), beta=beta, activated=True)
  return out.reshape(labels.shape)


def topk_hungarian_assign(probs, boxes_px, *, gt_boxes, gt_labels, gt_valid,
                          img_shapes, topk=4, alpha=1.0, beta=6.0,
                          cls_weight=2.0, l1_weight=5.0, iou_weight=2.0,
                          solver='scipy'):
  """1-to-k assignment + normalised alignment metrics (all detached).

  Args: probs (..., B, N, K) sigmoid scores; boxes_px (..., B, N, 4) xyxy in
    img_shape pixels; gt_boxes (B, G, 4) xyxy px; gt_labels (B, G) int;
    gt_valid (B, G) bool; img_shapes (B, 2) (h, w).  Leading dims (e.g.
    layers) are matched in one solver call.  cls/l1/iou_weight: the
    matching costs' weights (config ``loss.match_*``).
  Returns: assigned_gt (..., B, N) int32 (-1 = background) and
    norm_metrics (..., B, N) float (0 for background).
  """
  gt_boxes, gt_labels, gt_valid, img_shapes = basic.as_gt_arrays(
      gt_boxes, gt_labels, gt_valid, img_shapes)
  probs = jax.lax.stop_gradient(probs)
  boxes_px = jax.lax.stop_gradient(boxes_px)
  n, g = probs.shape[-2], gt_boxes.shape[-2]
  labels = jnp.clip(jnp.where(gt_valid, gt_labels, 0).astype(jnp.int32), 0,
                    probs.shape[-1] - 1)
  iou = box_ops.pairwise_iou(boxes_px, gt_boxes, eps=1e-6)      # (.., B, N, G)
  idx = jnp.broadcast_to(labels[:, None, :], probs.shape[:-1] + (g,))
  scores = take_along_axis_in_range(probs, idx, axis=-1)        # (.., B, N, G)
  metrics = _int_pow(scores, alpha) * _int_pow(iou, beta)

  def one(p, bx, gb, gl, hw):
    # FocalLossCost on the probabilities (sigmoid applied again, as the
    # reference), BBoxL1Cost xyxy / img_shape, IoUCost giou.
    return mc.hungarian_cost(cls_logits=p, pred_xyxy=bx, gt_labels=gl,
                             gt_boxes_xyxy=gb, img_hw=hw, box_format='xyxy',
                             cls_weight=cls_weight, l1_weight=l1_weight,
                             iou_weight=iou_weight)
  cost = mc.batched_cost(one, (probs, boxes_px), (gt_boxes, labels),
                         img_shapes=img_shapes)                # (.., B, N, G)
  num_gt = jnp.sum(gt_valid, -1)                                # (B,)
  k_img = jnp.where(num_gt > 0,
                    jnp.minimum(topk, div_nonneg(
                        jnp.full(num_gt.shape, n, jnp.int32),
                        jnp.maximum(num_gt, 1).astype(jnp.int32))), 0)
  rep = jnp.repeat(cost, topk, axis=-1)                         # col g*topk+r
  col_gt = np.arange(g * topk) // topk
  col_r = np.arange(g * topk) % topk
  col_valid = gt_valid[:, col_gt] & (col_r[None, :] < k_img[:, None])
  row_valid = jnp.ones(probs.shape[:-1], bool)
  col_valid = jnp.broadcast_to(col_valid, cost.shape[:-2] + (g * topk,))
  col = hungarian_match_batched(rep, row_valid=row_valid, col_valid=col_valid,
                                solver=solver)
  assigned = jnp.where(col >= 0, div_nonneg(jnp.maximum(col, 0), topk),
                       -1).astype(jnp.int32)
  pos = assigned >= 0
  onehot = (assigned[..., None] == jnp.arange(g)) & pos[..., None]  # (.., N, G)
  m_i = jnp.sum(jnp.where(onehot, metrics, 0.0), -1)
  max_m = jnp.max(jnp.where(onehot, metrics, -jnp.inf), -2)       # (.., B, G)
  max_iou = jnp.max(jnp.where(onehot, iou, -jnp.inf), -2)
  max_m_i = jnp.sum(jnp.where(onehot, max_m[..., None, :], 0.0), -1)
  max_iou_i = jnp.sum(jnp.where(onehot, max_iou[..., None, :], 0.0), -1)
  norm = jnp.where(pos, m_i / (max_m_i + 10e-8) * max_iou_i, 0.0)
  return assigned, jax.lax.stop_gradient(norm)


def dense_aux_loss(cls_logits, bbox_preds, *, gt_boxes, gt_labels, gt_valid,
                   img_shapes, topk=4, alpha=1.0, beta=6.0, qfl_beta=2.0,
                   cls_weight=1.0, bbox_weight=2.0, match_cls_weight=2.0,
                   match_l1_weight=5.0, match_iou_weight=2.0, solver='scipy',
                   axis_name=None):
  """``DDQAuxLoss.loss`` for dense queries, summed over images.

  Args:
    cls_logits: (..., B, N, K) class logits (sigmoid is applied here).
    bbox_preds: (..., B, N, 4) sigmoid cxcywh, normalised by img_shape.
    gt_boxes (B, G, 4) xyxy px, gt_labels (B, G), gt_valid (B, G),
    img_shapes (B, 2) (h, w).  Leading dims (decoder layers) are independent
    losses sharing one solver call.  match_*: the 1-to-k matching costs'
    weights.
  Returns: (loss_cls, loss_bbox), each of shape (...) (scalars without
    leading dims).
  """
  gt_boxes, gt_labels, gt_valid, img_shapes = basic.as_gt_arrays(
      gt_boxes, gt_labels, gt_valid, img_shapes)
  probs = jax.nn.sigmoid(cls_logits)
  factor = box_ops.image_size_factor(img_shapes, bbox_preds.dtype)[:, None]
  boxes_px = box_ops.cxcywh_to_xyxy(bbox_preds) * factor
  k = probs.shape[-1]
  assigned, norm = topk_hungarian_assign(
      probs, boxes_px, gt_boxes=gt_boxes, gt_labels=gt_labels,
      gt_valid=gt_valid, img_shapes=img_shapes, topk=topk, alpha=alpha,
      beta=beta, cls_weight=match_cls_weight, l1_weight=match_l1_weight,
      iou_weight=match_iou_weight, solver=solver)
  pos = assigned >= 0
  safe = jnp.maximum(assigned, 0)
  b_idx = jnp.arange(gt_boxes.shape[0])[:, None]
  labels = jnp.where(pos, gt_labels[b_idx, safe], k)
  tgt = gt_boxes[b_idx, safe]                                 # (.., B, N, 4)
  has_gt = jnp.any(gt_valid, -1)                              # (B,)
  label_w = jnp.broadcast_to(has_gt[:, None], labels.shape).astype(probs.dtype)
  # Per image: weight_reduce_loss with avg_factor 1 (the per-image call of
  # the reference), then summed over images and divided by the clamped
  # device mean of the metric sum.
  cls_img = basic.reduce_with_avg_factor(
      jnp.sum(qfl_prob_rows(probs, labels, norm, beta=qfl_beta) * label_w,
              -1) * cls_weight, 1.0)
  tgt = jnp.where(pos[..., None], tgt, boxes_px)
  giou = basic.giou_loss(boxes_px, jax.lax.stop_gradient(tgt))
  bbox_img = basic.reduce_with_avg_factor(
      jnp.sum(jnp.where(pos, giou * norm, 0.0), -1) * bbox_weight, 1.0)
  avg = basic.avg_factor(jnp.sum(norm, (-2, -1)), axis_name=axis_name)
  return jnp.sum(cls_img, -1) / avg, jnp.sum(bbox_img, -1) / avg
