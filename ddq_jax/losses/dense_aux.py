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

This file also holds private elementary helpers (focal / QFL / L1 / GIoU
sums, matching costs, a scipy matcher) used while ``basic.py``,
``match_costs.py`` and ``hungarian.py`` are not in the tree.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.ops import boxes as box_ops

F32_EPS = float(np.finfo(np.float32).eps)   # mmdet weight_reduce_loss eps

# --------------------------------------------------------------------------
# Private elementary pieces (fallback until ddq_jax/losses/basic.py,
# match_costs.py and hungarian.py land; same arithmetic as mmdet).
# --------------------------------------------------------------------------


def _bce_with_logits(x, t):
  """torch's ``binary_cross_entropy_with_logits`` (reduction none)."""
  return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _bce_prob(p, t):
  """torch's ``F.binary_cross_entropy`` (logs clamped at -100)."""
  logp = jnp.maximum(jnp.log(p), -100.0)
  log1mp = jnp.maximum(jnp.log(1 - p), -100.0)
  return -(t * logp + (1 - t) * log1mp)


def sigmoid_focal_elementwise(logits, targets, *, alpha=0.25, gamma=2.0):
  """mmdet ``py_sigmoid_focal_loss`` before reduction: (..., K) -> (..., K).
  ``targets`` one-hot float (..., K)."""
  p = jax.nn.sigmoid(logits)
  pt = (1 - p) * targets + p * (1 - targets)
  fw = (alpha * targets + (1 - alpha) * (1 - targets)) * pt**gamma
  return _bce_with_logits(logits, targets) * fw


def qfl_prob_rows(probs, labels, scores, *, beta=2.0):
  """mmdet ``quality_focal_loss_with_prob`` per row.

  probs (..., K) in [0, 1]; labels (...) int, K = background;
  scores (...) quality targets.  Returns (...) summed over K.
  """
  k = probs.shape[-1]
  neg = _bce_prob(probs, 0.0) * probs**beta
  onehot = jax.nn.one_hot(labels, k, dtype=probs.dtype)   # bg -> all zeros
  p_lab = jnp.sum(probs * onehot, -1)
  pos = _bce_prob(p_lab, scores) * jnp.abs(scores - p_lab)**beta
  is_pos = (labels >= 0) & (labels < k)
  loss = jnp.sum(neg * (1 - onehot), -1) + jnp.where(
      is_pos, pos, jnp.sum(neg * onehot, -1))
  return loss


def focal_cost(logits, gt_labels, *, weight, alpha=0.25, gamma=2.0,
               eps=1e-12):
  """mmdet ``FocalLossCost``: (..., R, K) logits, (..., C) labels -> (..., R, C)."""
  p = jax.nn.sigmoid(logits)
  neg = -jnp.log(1 - p + eps) * (1 - alpha) * p**gamma
  pos = -jnp.log(p + eps) * alpha * (1 - p)**gamma
  diff = pos - neg
  idx = jnp.broadcast_to(gt_labels[..., None, :],
                         diff.shape[:-1] + gt_labels.shape[-1:])
  return jnp.take_along_axis(diff, idx, axis=-1) * weight


def l1_cost(pred_norm, gt_norm, *, weight):
  """``torch.cdist(p=1)``: (..., R, 4) x (..., C, 4) -> (..., R, C)."""
  return jnp.sum(jnp.abs(pred_norm[..., :, None, :] - gt_norm[..., None, :, :]),
                 -1) * weight


def giou_cost(pred_px, gt_px, *, weight):
  """mmdet ``IoUCost(iou_mode='giou')``: -GIoU, (..., R, C)."""
  return -box_ops.pairwise_giou(pred_px, gt_px, eps=1e-6) * weight


def _scipy_match_np(cost, row_valid, col_valid):
  from scipy.optimize import linear_sum_assignment
  cost = np.asarray(cost)
  row_valid = np.asarray(row_valid)
  col_valid = np.asarray(col_valid)
  out = np.full(cost.shape[:-1], -1, np.int32)
  flat_c = cost.reshape((-1,) + cost.shape[-2:])
  flat_r = row_valid.reshape((-1, cost.shape[-2]))
  flat_v = col_valid.reshape((-1, cost.shape[-1]))
  flat_o = out.reshape((-1, cost.shape[-2]))
  for n in range(flat_c.shape[0]):
    rows = np.nonzero(flat_r[n])[0]
    cols = np.nonzero(flat_v[n])[0]
    if rows.size == 0 or cols.size == 0:
      continue
    ri, ci = linear_sum_assignment(flat_c[n][np.ix_(rows, cols)])
    flat_o[n, rows[ri]] = cols[ci]
  return flat_o.reshape(out.shape)


def _fallback_match(cost, *, row_valid, col_valid, solver='scipy'):
  """(..., R, C) cost -> (..., R) int32 column per row, -1 unmatched.
  Exact ``linear_sum_assignment`` on the valid sub-matrix (host callback)."""
  if solver != 'scipy':
    raise NotImplementedError(f'fallback matcher: solver {solver!r}')
  out_shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
  return jax.pure_callback(_scipy_match_np, out_shape, cost, row_valid,
                           col_valid, vmap_method='sequential')


def get_matcher() -> Callable:
  """``hungarian_match`` from ddq_jax.losses.hungarian when available,
  else the private scipy fallback.  Signature:
  ``match(cost (..., R, C), *, row_valid, col_valid, solver) -> (..., R)``."""
  try:
    from ddq_jax.losses.hungarian import hungarian_match  # noqa: F401
    return _batched(hungarian_match)
  except ImportError:
    return _fallback_match


def _batched(fn):
  """Adapts a matcher that may only take a single (R, C) matrix."""
  def match(cost, *, row_valid, col_valid, solver='scipy'):
    lead = cost.shape[:-2]
    if not lead:
      return fn(cost, row_valid=row_valid, col_valid=col_valid, solver=solver)
    c = cost.reshape((-1,) + cost.shape[-2:])
    r = jnp.broadcast_to(row_valid, lead + row_valid.shape[-1:]).reshape(
        (-1, cost.shape[-2]))
    v = jnp.broadcast_to(col_valid, lead + col_valid.shape[-1:]).reshape(
        (-1, cost.shape[-1]))
    out = jax.vmap(lambda a, b, d: fn(a, row_valid=b, col_valid=d,
                                      solver=solver))(c, r, v)
    return out.reshape(cost.shape[:-1])
  return match


def reduce_mean(x, axis_name: Optional[str]):
  """mmdet ``reduce_mean``: mean over devices (identity without an axis)."""
  if axis_name is None:
    return x
  return jax.lax.pmean(x, axis_name)


# --------------------------------------------------------------------------
# Dense auxiliary loss
# --------------------------------------------------------------------------


def _factor(img_shapes, dtype):
  """(B, 2) (h, w) -> (B, 1, 4) (w, h, w, h)."""
  h = img_shapes[:, 0].astype(dtype)
  w = img_shapes[:, 1].astype(dtype)
  return jnp.stack([w, h, w, h], -1)[:, None, :]


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
  probs = jax.lax.stop_gradient(probs)
  boxes_px = jax.lax.stop_gradient(boxes_px)
  n, g = probs.shape[-2], gt_boxes.shape[-2]
  labels = jnp.where(gt_valid, gt_labels, 0).astype(jnp.int32)
  iou = box_ops.pairwise_iou(boxes_px, gt_boxes, eps=1e-6)      # (.., B, N, G)
  idx = jnp.broadcast_to(labels[:, None, :], probs.shape[:-1] + (g,))
  scores = jnp.take_along_axis(probs, idx, axis=-1)             # (.., B, N, G)
  metrics = scores**alpha * iou**beta
  factor = _factor(img_shapes, probs.dtype)
  cost = (focal_cost(probs, labels, weight=2.0)
          + l1_cost(boxes_px / factor, gt_boxes / factor, weight=5.0)
          + giou_cost(boxes_px, gt_boxes, weight=2.0))          # (.., B, N, G)
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
  iou_i = jnp.sum(jnp.where(onehot, iou, 0.0), -1)
  max_m = jnp.max(jnp.where(onehot, metrics, -jnp.inf), -2)       # (.., B, G)
  max_iou = jnp.max(jnp.where(onehot, iou, -jnp.inf), -2)
  max_m_i = jnp.sum(jnp.where(onehot, max_m[..., None, :], 0.0), -1)
  max_iou_i = jnp.sum(jnp.where(onehot, max_iou[..., None, :], 0.0), -1)
  norm = jnp.where(pos, m_i / (max_m_i + 10e-8) * max_iou_i, 0.0)
  del iou_i
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
