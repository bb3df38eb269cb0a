"""Matching costs of mmdet 3.3.0 (task_modules/assigners/match_cost.py).

Pure jnp functions, every one returns a (Q, G) cost matrix *already
multiplied by its weight*, exactly as the reference classes do:

- ``focal_loss_cost``  = ``FocalLossCost`` (applies a sigmoid to its input;
  note ``TopkHungarianAssigner`` feeds it probabilities, so the reference
  applies the sigmoid twice there: pass the probabilities and get the same).
- ``bbox_l1_cost``     = ``BBoxL1Cost`` (``torch.cdist(p=1)`` on boxes that
  were divided by ``[w, h, w, h]`` of ``img_shape``).
- ``iou_cost``         = ``IoUCost`` (``-bbox_overlaps(mode)``, xyxy pixels).
- ``hungarian_cost``   = the sum the DETR ``HungarianAssigner`` (and DDQ's
  ``TopkHungarianAssigner``, with ``box_format='xyxy'``) builds from the
  three, with the box conversions of ``DETRHead._get_targets_single``.
  The criterion and the dense auxiliary loss both call it.

Padded ground truth: the costs are computed for every column; make padded
columns unmatchable with ``col_valid`` in ``hungarian.hungarian_match``.
Labels outside [0, K) are clipped for the gather (their cost is garbage but
finite).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ddq_jax.ops.boxes import cxcywh_to_xyxy
from ddq_jax.ops.indexing import take_in_range
from ddq_jax.ops.boxes import image_size_factor
from ddq_jax.ops.boxes import pairwise_giou
from ddq_jax.ops.boxes import pairwise_iou
from ddq_jax.ops.boxes import xyxy_to_cxcywh


def focal_loss_cost(cls_logits: jnp.ndarray, gt_labels: jnp.ndarray, *,
                    weight: float = 2.0, alpha: float = 0.25,
                    gamma: float = 2.0, eps: float = 1e-12) -> jnp.ndarray:
  """``FocalLossCost``: (Q, K) logits x (G,) int labels -> (Q, G).

  p = sigmoid(x); neg = -log(1 - p + eps) (1 - alpha) p^gamma;
  pos = -log(p + eps) alpha (1 - p)^gamma; cost = (pos - neg)[:, labels].

  Written as ``log(max(1 - p, 0) + eps)``: under jit XLA re-associates
  ``1 - p + eps`` into ``(1 + eps) - p`` (= 1 - p in float32), which gives
  -inf where p == 1 and makes the host solver reject the matrix.
  """
  p = jax.nn.sigmoid(cls_logits)
  neg = -jnp.log(jnp.maximum(1 - p, 0.0) + eps) * (1 - alpha) * p**gamma
  pos = -jnp.log(jnp.maximum(p, 0.0) + eps) * alpha * (1 - p)**gamma
  labels = jnp.clip(gt_labels.astype(jnp.int32), 0, cls_logits.shape[-1] - 1)
  cost = (take_in_range(pos, labels, axis=-1)
          - take_in_range(neg, labels, axis=-1))
  return cost * weight


def bbox_l1_cost(pred_boxes: jnp.ndarray, gt_boxes: jnp.ndarray, *,
                 weight: float = 5.0) -> jnp.ndarray:
  """``BBoxL1Cost`` core: (Q, 4) x (G, 4) boxes, both already normalised
  (and in the same format) -> (Q, G) weighted L1 distance.

  Summed coordinate by coordinate: no (Q, G, 4) intermediate with a minor
  axis of 4, which XLA:CPU handles poorly."""
  out = jnp.abs(pred_boxes[:, None, 0] - gt_boxes[None, :, 0])
  for k in range(1, 4):
    out = out + jnp.abs(pred_boxes[:, None, k] - gt_boxes[None, :, k])
  return out * weight


def bbox_l1_cost_pixels(pred_xyxy: jnp.ndarray, gt_xyxy: jnp.ndarray, *,
                        img_hw: jnp.ndarray, box_format: str = 'xyxy',
                        weight: float = 5.0) -> jnp.ndarray:
  """``BBoxL1Cost`` exactly as the class: xyxy pixel boxes in, optionally
  converted to cxcywh (``box_format='xywh'``), divided by [w, h, w, h]."""
  if box_format == 'xywh':
    pred_xyxy = xyxy_to_cxcywh(pred_xyxy)
    gt_xyxy = xyxy_to_cxcywh(gt_xyxy)
  elif box_format != 'xyxy':
    raise ValueError(box_format)
  f = image_size_factor(img_hw, pred_xyxy.dtype)
  return bbox_l1_cost(pred_xyxy / f, gt_xyxy / f, weight=weight)


def iou_cost(pred_xyxy: jnp.ndarray, gt_xyxy: jnp.ndarray, *,
             weight: float = 2.0, iou_mode: str = 'giou') -> jnp.ndarray:
  """``IoUCost``: -overlaps(pred, gt) * weight, xyxy (pixels) -> (Q, G)."""
  if iou_mode == 'giou':
    overlaps = pairwise_giou(pred_xyxy, gt_xyxy)
  elif iou_mode == 'iou':
    overlaps = pairwise_iou(pred_xyxy, gt_xyxy)
  else:
    raise ValueError(iou_mode)
  return -overlaps * weight


def hungarian_cost(*, cls_logits: jnp.ndarray,
                   gt_labels: jnp.ndarray,
                   img_hw: jnp.ndarray,
                   boxes_cxcywh_norm: Optional[jnp.ndarray] = None,
                   pred_xyxy: Optional[jnp.ndarray] = None,
                   gt_boxes_cxcywh_norm: Optional[jnp.ndarray] = None,
                   gt_boxes_xyxy: Optional[jnp.ndarray] = None,
                   box_format: str = 'xywh',
                   cls_weight: float = 2.0, l1_weight: float = 5.0,
                   iou_weight: float = 2.0, alpha: float = 0.25,
                   gamma: float = 2.0, eps: float = 1e-12,
                   iou_mode: str = 'giou') -> jnp.ndarray:
  """One-to-one DETR matching cost of one image, (Q, G).

  Args:
    cls_logits: (Q, K) class logits (``FocalLossCost`` applies a sigmoid;
      DDQ's 1-to-k assigner passes probabilities here, as the reference).
    gt_labels: (G,) int labels.
    img_hw: (2,) the image's real (h, w) = ``img_meta['img_shape']``.
    boxes_cxcywh_norm: (Q, 4) predicted sigmoid cxcywh (normalised); or
      instead ``pred_xyxy`` (Q, 4) in ``img_shape`` pixels.
    gt_boxes_cxcywh_norm: (G, 4) gt in normalised cxcywh; or instead
      ``gt_boxes_xyxy`` (G, 4) in ``img_shape`` pixels (the reference's own
      input; bit-closer because no round trip).
    box_format: ``BBoxL1Cost``'s: 'xywh' (``HungarianAssigner`` of DINO /
      DDQ) or 'xyxy' (``TopkHungarianAssigner``).

  Same arithmetic as the reference: predictions -> xyxy * factor (pixels);
  FocalLossCost on the logits; BBoxL1Cost on the (converted) pixel boxes /
  factor; IoUCost on the pixel boxes.
  """
  dtype = (boxes_cxcywh_norm if pred_xyxy is None else pred_xyxy).dtype
  f = image_size_factor(img_hw, dtype)
  if pred_xyxy is None:
    pred_xyxy = cxcywh_to_xyxy(boxes_cxcywh_norm) * f
  if gt_boxes_xyxy is None:
    if gt_boxes_cxcywh_norm is None:
      raise ValueError('give gt_boxes_cxcywh_norm or gt_boxes_xyxy')
    gt_boxes_xyxy = cxcywh_to_xyxy(gt_boxes_cxcywh_norm) * f
  c_cls = focal_loss_cost(cls_logits, gt_labels, weight=cls_weight,
                          alpha=alpha, gamma=gamma, eps=eps)
  c_l1 = bbox_l1_cost_pixels(pred_xyxy, gt_boxes_xyxy, img_hw=img_hw,
                             box_format=box_format, weight=l1_weight)
  c_iou = iou_cost(pred_xyxy, gt_boxes_xyxy, weight=iou_weight,
                   iou_mode=iou_mode)
  # torch.stack(cost_list).sum(0): ((cls + l1) + iou)
  return c_cls + c_l1 + c_iou


def batched_cost(fn, preds, gts, *, img_shapes):
  """Applies a one-image cost ``fn(*preds, *gts, img_hw) -> (Q, G)`` to
  preds (..., B, Q, x) and gts (B, G, ...), img_shapes (B, 2) ->
  (..., B, Q, G) (leading dims such as decoder layers share the gts)."""
  lead = preds[0].shape[:-2]                       # (..., B)
  p_flat = [p.reshape((-1,) + p.shape[-2:]) for p in preds]
  g_flat = [jnp.broadcast_to(g, lead + g.shape[1:]).reshape((-1,) + g.shape[1:])
            for g in gts]
  hw = jnp.broadcast_to(img_shapes, lead + (2,)).reshape(-1, 2)
  out = jax.vmap(fn)(*p_flat, *g_flat, hw)
  return out.reshape(lead + out.shape[1:])
