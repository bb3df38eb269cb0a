"""DDQ's dense auxiliary loss (mmdet ``DDQAuxLoss`` + ``TopkHungarianAssigner``).

Static shapes throughout: B images, N dense queries, G ground-truth slots
(``gt_valid`` marks the real ones), K classes, ``topk`` = ``aux_num_pos``.

Reference semantics reproduced (mmdet 3.3.0):
- assignment on detached inputs; cost = FocalLossCost(w=2) applied to the
  *probabilities* (the reference sigmoids them a second time) + BBoxL1Cost
  (xyxy, normalised by img_shape, w=5) + IoUCost(giou, w=2);
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

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.ops import boxes as box_ops

from ddq_jax.losses import basic
from ddq_jax.losses import match_costs as mc
from ddq_jax.losses.hungarian import hungarian_match

F32_EPS = float(np.finfo(np.float32).eps)   # mmdet weight_reduce_loss eps


def sigmoid_focal_elementwise(logits, targets, *, alpha=0.25, gamma=2.0):
  """mmdet ``py_sigmoid_focal_loss`` before reduction, (..., K) -> (..., K);
  ``targets`` one-hot float (..., K) (background rows all zero)."""
  return basic.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)


def qfl_prob_rows(probs, labels, scores, *, beta=2.0):
  """mmdet ``quality_focal_loss_with_prob`` per row: probs (..., K),
  labels (...) (K = background), scores (...) -> (...)."""
  k = probs.shape[-1]
  out = basic.quality_focal_loss(probs.reshape(-1, k), labels.reshape(-1),
                                 scores.reshape(-1), beta=beta, activated=True)
  return out.reshape(labels.shape)


def _int_pow(x, e):
  """x ** e with an integer exponent as repeated products (torch's pow with
  an int exponent; much faster than exp/log pow on XLA:CPU)."""
  return x ** int(e) if float(e).is_integer() else x ** e


def per_image_cost(fn, preds, gts, *, img_shapes):
  """Applies a one-image cost ``fn(*preds, *gts, img_hw) -> (Q, G)`` to
  preds (..., B, Q, x) and gts (B, G, ...), img_shapes (B, 2) -> (..., B, Q, G)."""
  lead = preds[0].shape[:-2]                       # (..., B)
  p_flat = [p.reshape((-1,) + p.shape[-2:]) for p in preds]
  g_flat = [jnp.broadcast_to(g, lead + g.shape[1:]).reshape((-1,) + g.shape[1:])
            for g in gts]
  hw = jnp.broadcast_to(img_shapes, lead + (2,)).reshape(-1, 2)
  out = jax.vmap(fn)(*p_flat, *g_flat, hw)
  return out.reshape(lead + out.shape[1:])


def reduce_mean(x, axis_name: Optional[str]):
  """mmdet ``reduce_mean``: mean over devices (identity without an axis)."""
  if axis_name is None:
    return x
  return jax.lax.pmean(x, axis_name)


def _batched(fn):
  """A one-matrix matcher over leading dims (vmap: one host callback)."""
  def match(cost, *, row_valid, col_valid, solver='scipy'):
    lead = cost.shape[:-2]
    r, c = cost.shape[-2:]
    row_valid = jnp.broadcast_to(row_valid, lead + (r,)).reshape(-1, r)
    col_valid = jnp.broadcast_to(col_valid, lead + (c,)).reshape(-1, c)
    out = jax.vmap(lambda a, b, d: fn(a, row_valid=b, col_valid=d,
                                      solver=solver))(
        cost.reshape(-1, r, c), row_valid, col_valid)
    return out.reshape(lead + (r,))
  return match


def get_matcher() -> Callable:
  """``hungarian.hungarian_match`` over leading dims (one solver call):
  ``match(cost (..., R, C), *, row_valid, col_valid, solver) -> (..., R)``."""
  return _batched(hungarian_match)


# --------------------------------------------------------------------------
# Dense auxiliary loss
# --------------------------------------------------------------------------


def as_gt_arrays(gt_boxes, gt_labels, gt_valid, img_shapes):
  """numpy or jax inputs -> jnp (float32 boxes, int32 labels, bool valid)."""
  return (jnp.asarray(gt_boxes, jnp.float32), jnp.asarray(gt_labels, jnp.int32),
          jnp.asarray(gt_valid, bool), jnp.asarray(img_shapes))


def _factor(img_shapes, dtype):
  """(B, 2) (h, w) -> (B, 1, 4) (w, h, w, h)."""
  return mc.whwh(img_shapes, dtype)[:, None, :]


def topk_hungarian_assign(probs, boxes_px, *, gt_boxes, gt_labels, gt_valid,
                          img_shapes, topk=4, alpha=1.0, beta=6.0,
                          solver='scipy', match_fn=None):
  """1-to-k assignment + normalised alignment metrics (all detached).

  Args: probs (..., B, N, K) sigmoid scores; boxes_px (..., B, N, 4) xyxy in
    img_shape pixels; gt_boxes (B, G, 4) xyxy px; gt_labels (B, G) int;
    gt_valid (B, G) bool; img_shapes (B, 2) (h, w).  Leading dims (e.g.
    layers) are matched in one solver call.
  Returns: assigned_gt (..., B, N) int32 (-1 = background) and
    norm_metrics (..., B, N) float (0 for background).
  """
  match_fn = match_fn or get_matcher()
  gt_boxes, gt_labels, gt_valid, img_shapes = as_gt_arrays(
      gt_boxes, gt_labels, gt_valid, img_shapes)
  probs = jax.lax.stop_gradient(probs)
  boxes_px = jax.lax.stop_gradient(boxes_px)
  n, g = probs.shape[-2], gt_boxes.shape[-2]
  labels = jnp.where(gt_valid, gt_labels, 0).astype(jnp.int32)
  iou = box_ops.pairwise_iou(boxes_px, gt_boxes, eps=1e-6)      # (.., B, N, G)
  idx = jnp.broadcast_to(labels[:, None, :], probs.shape[:-1] + (g,))
  scores = jnp.take_along_axis(probs, idx, axis=-1)             # (.., B, N, G)
  metrics = _int_pow(scores, alpha) * _int_pow(iou, beta)

  def one(p, bx, gb, gl, hw):
    # FocalLossCost on the probabilities (sigmoid applied again, as the
    # reference), BBoxL1Cost xyxy / img_shape, IoUCost giou; sum in the
    # reference's order.
    return (mc.focal_loss_cost(p, gl, weight=2.0)
            + mc.bbox_l1_cost(bx / mc.whwh(hw, bx.dtype),
                              gb / mc.whwh(hw, bx.dtype),
                              weight=5.0)
            + mc.iou_cost(bx, gb, weight=2.0, iou_mode='giou'))
  cost = per_image_cost(one, (probs, boxes_px), (gt_boxes, labels),
                        img_shapes=img_shapes)                 # (.., B, N, G)
  num_gt = jnp.sum(gt_valid, -1)                                # (B,)
  k_img = jnp.where(num_gt > 0,
                    jnp.minimum(topk, n // jnp.maximum(num_gt, 1)), 0)
  rep = jnp.repeat(cost, topk, axis=-1)                         # col g*topk+r
  col_gt = jnp.arange(g * topk) // topk
  col_r = jnp.arange(g * topk) % topk
  col_valid = gt_valid[:, col_gt] & (col_r[None, :] < k_img[:, None])
  row_valid = jnp.ones(probs.shape[:-1], bool)
  col_valid = jnp.broadcast_to(col_valid, cost.shape[:-2] + (g * topk,))
  col = match_fn(rep, row_valid=row_valid, col_valid=col_valid, solver=solver)
  assigned = jnp.where(col >= 0, col // topk, -1).astype(jnp.int32)
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
                   cls_weight=1.0, bbox_weight=2.0, solver='scipy',
                   axis_name=None, match_fn=None):
  """``DDQAuxLoss.loss`` for dense queries, summed over images.

  Args:
    cls_logits: (..., B, N, K) class logits (sigmoid is applied here).
    bbox_preds: (..., B, N, 4) sigmoid cxcywh, normalised by img_shape.
    gt_boxes (B, G, 4) xyxy px, gt_labels (B, G), gt_valid (B, G),
    img_shapes (B, 2) (h, w).  Leading dims (decoder layers) are independent
    losses sharing one solver call.
  Returns: (loss_cls, loss_bbox), each of shape (...) (scalars without
    leading dims).
  """
  gt_boxes, gt_labels, gt_valid, img_shapes = as_gt_arrays(
      gt_boxes, gt_labels, gt_valid, img_shapes)
  probs = jax.nn.sigmoid(cls_logits)
  factor = _factor(img_shapes, bbox_preds.dtype)
  boxes_px = box_ops.cxcywh_to_xyxy(bbox_preds) * factor
  k = probs.shape[-1]
  assigned, norm = topk_hungarian_assign(
      probs, boxes_px, gt_boxes=gt_boxes, gt_labels=gt_labels,
      gt_valid=gt_valid, img_shapes=img_shapes, topk=topk, alpha=alpha,
      beta=beta, solver=solver, match_fn=match_fn)
  pos = assigned >= 0
  safe = jnp.maximum(assigned, 0)
  b_idx = jnp.arange(gt_boxes.shape[0])[:, None]
  labels = jnp.where(pos, gt_labels[b_idx, safe], k)
  tgt = gt_boxes[b_idx, safe]                                 # (.., B, N, 4)
  has_gt = jnp.any(gt_valid, -1)                              # (B,)
  label_w = jnp.broadcast_to(has_gt[:, None], labels.shape).astype(probs.dtype)
  cls_img = jnp.sum(qfl_prob_rows(probs, labels, norm, beta=qfl_beta)
                    * label_w, -1) * cls_weight / (1.0 + F32_EPS)
  tgt = jnp.where(pos[..., None], tgt, boxes_px)
  giou = box_ops.aligned_giou(boxes_px, jax.lax.stop_gradient(tgt), eps=1e-6)
  bbox_img = jnp.sum(jnp.where(pos, (1 - giou) * norm, 0.0),
                     -1) * bbox_weight / (1.0 + F32_EPS)      # (.., B)
  avg = jnp.sum(norm, (-2, -1))
  avg = jnp.maximum(reduce_mean(avg, axis_name), 1.0)
  return jnp.sum(cls_img, -1) / avg, jnp.sum(bbox_img, -1) / avg
