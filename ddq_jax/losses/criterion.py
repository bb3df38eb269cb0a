"""DDQ-DETR training criterion: mmdet 3.3.0 ``DDQDETRHead.loss`` /
``loss_by_feat`` as one pure, jit-able function with static shapes.

Query layout of the head outputs (Q = D + Qd + Nd):
  [0, D)          denoising slots (the reference's used ``num_denoising_queries``
                  are a prefix, see dn_loss.py),
  [D, D + Qd)     distinct queries (Qd = num_queries),
  [D + Qd, Q)     dense queries (Nd = num_dense, static).

Terms (keys exactly as the reference's loss dict; ``d{i}.`` = decoder layer
i < L-1, unprefixed = last layer):
  loss_cls/bbox/iou, d{i}.loss_*     distinct queries, 1-to-1 Hungarian,
                                     focal + 5 L1 + 2 GIoU;
  enc_loss_*                         encoder top-k queries (real labels);
  dn_loss_*, d{i}.dn_loss_*          denoising queries;
  {l}_aux_aux_loss_cls/bbox          dense queries of decoder layer l
                                     (1-to-k, QFL + 2 GIoU, summed over images);
  aux_enc_aux_loss_cls/bbox          dense encoder top-k queries.

Distinct-query masks: the head uses, for decoder layer l > 0, the mask left
by layer l-1's distinct-query NMS (the reference reads row 0 of the inverted
attention mask: the decoder provides it); layer 0 uses every query.
Non-distinct queries are unmatchable and carry zero loss weight, which
equals the reference's boolean-indexed computation.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import jax
import jax.numpy as jnp

from ddq_jax.ops import boxes as box_ops
from ddq_jax.losses import match_costs as mc
from ddq_jax.losses.dense_aux import (F32_EPS, as_gt_arrays, dense_aux_loss,
                                      get_matcher, per_image_cost,
                                      reduce_mean, sigmoid_focal_elementwise)
from ddq_jax.losses.dn_loss import box_losses, dn_loss


@dataclasses.dataclass(frozen=True)
class CriterionConfig:
  """Loss hyper-parameters (mmdet defaults for DDQ-DETR); hashable/static."""
  num_classes: int = 80
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  cls_weight: float = 1.0
  bbox_weight: float = 5.0
  iou_weight: float = 2.0
  match_cls_weight: float = 2.0
  match_bbox_weight: float = 5.0
  match_iou_weight: float = 2.0
  aux_num_pos: int = 4
  aux_alpha: float = 1.0
  aux_beta: float = 6.0
  num_dn_queries: int = 100
  solver: str = 'scipy'

  @classmethod
  def from_config(cls, c) -> 'CriterionConfig':
    """From the project's ml_collections config (``c.loss``, ``c.dn``...)."""
    loss = c.loss
    get = lambda k, d: loss.get(k, d) if hasattr(loss, 'get') else d
    return cls(
        num_classes=int(c.get('num_classes', 80)),
        focal_alpha=float(get('focal_alpha', 0.25)),
        focal_gamma=float(get('focal_gamma', 2.0)),
        cls_weight=float(get('cls_weight', 1.0)),
        bbox_weight=float(get('bbox_weight', 5.0)),
        iou_weight=float(get('iou_weight', 2.0)),
        match_cls_weight=float(get('match_cls_weight', 2.0)),
        match_bbox_weight=float(get('match_bbox_weight', 5.0)),
        match_iou_weight=float(get('match_iou_weight', 2.0)),
        aux_num_pos=int(get('aux_num_pos', 4)),
        aux_alpha=float(get('aux_alpha', 1.0)),
        aux_beta=float(get('aux_beta', 6.0)),
        num_dn_queries=int(c.dn.num_dn_queries),
        solver=resolve_solver(str(get('hungarian_solver', 'auto'))))


def resolve_solver(name: str, *, num_devices: int = 1) -> str:
  """'auto' -> 'scipy' for a single-device step on the CPU (fastest to
  compile, exact), 'jax' otherwise: on accelerators it avoids a host round
  trip per step, and on a multi-device mesh the scipy callback would gather
  every image's cost matrix onto one device and serialise the step."""
  if name != 'auto':
    if name not in ('scipy', 'jax'):
      raise ValueError(f"loss.hungarian_solver={name!r}: expected 'auto', "
                       "'scipy' or 'jax'")
    return name
  single_cpu = num_devices == 1 and jax.default_backend() == 'cpu'
  return 'scipy' if single_cpu else 'jax'


def hungarian_cost_distinct(cls_logits, bbox_preds, *, gt_boxes, gt_labels,
                            gt_valid, img_shapes, cfg: CriterionConfig):
  """HungarianAssigner cost of DINO/DDQ: FocalLossCost(2) + BBoxL1Cost(5,
  xywh, normalised) + IoUCost(giou, 2).  (..., B, Q, K), (..., B, Q, 4)
  sigmoid cxcywh -> (..., B, Q, G)."""
  gt_boxes, gt_labels, gt_valid, img_shapes = as_gt_arrays(
      gt_boxes, gt_labels, gt_valid, img_shapes)
  labels = jnp.where(gt_valid, gt_labels, 0).astype(jnp.int32)

  def one(c, bx, gb, gl, hw):
    # = match_costs.hungarian_cost with the jit-safe focal cost.
    f = mc.whwh(hw, bx.dtype)
    px = box_ops.cxcywh_to_xyxy(bx) * f
    return (mc.focal_loss_cost(c, gl, weight=cfg.match_cls_weight,
                               alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
            + mc.bbox_l1_cost(box_ops.xyxy_to_cxcywh(px) / f,
                      box_ops.xyxy_to_cxcywh(gb) / f,
                      weight=cfg.match_bbox_weight)
            + mc.iou_cost(px, gb, weight=cfg.match_iou_weight,
                          iou_mode='giou'))
  return per_image_cost(one, (cls_logits, bbox_preds), (gt_boxes, labels),
                        img_shapes=img_shapes)


def set_loss(cls_logits, bbox_preds, assigned, *, query_mask, gt_boxes,
             gt_labels, img_shapes, cfg: CriterionConfig,
             axis_name: Optional[str] = None):
  """``_loss_for_distinct_queries_single`` / ``loss_by_feat_single`` given
  an assignment.

  Args:
    cls_logits (..., B, Q, K), bbox_preds (..., B, Q, 4) sigmoid cxcywh;
    assigned (..., B, Q) int gt slot per query, -1 = background;
    query_mask (..., B, Q) bool: queries that exist for the loss.
  Returns: (loss_cls, loss_bbox, loss_iou), each of shape (...).
  """
  gt_boxes, gt_labels, _, img_shapes = as_gt_arrays(
      gt_boxes, gt_labels, False, img_shapes)
  k = cls_logits.shape[-1]
  pos = (assigned >= 0) & query_mask
  safe = jnp.maximum(assigned, 0)
  b_idx = jnp.arange(gt_boxes.shape[0])[:, None]
  labels = jnp.where(pos, gt_labels[b_idx, safe], k)
  onehot = jax.nn.one_hot(labels, k, dtype=cls_logits.dtype)
  fl = sigmoid_focal_elementwise(cls_logits, onehot, alpha=cfg.focal_alpha,
                                 gamma=cfg.focal_gamma)
  fl = jnp.sum(jnp.where(query_mask[..., None], fl, 0.0), (-3, -2, -1))
  num_pos = jnp.sum(pos, (-2, -1)).astype(cls_logits.dtype)
  avg = jnp.maximum(reduce_mean(num_pos, axis_name), 1.0)
  loss_cls = fl * cfg.cls_weight / (avg + F32_EPS)
  factor = mc.whwh(img_shapes, gt_boxes.dtype)[:, None, :]
  tgt = box_ops.xyxy_to_cxcywh(gt_boxes[b_idx, safe] / factor)
  tgt = jnp.where(pos[..., None], tgt, 0.0)
  loss_bbox, loss_iou = box_losses(bbox_preds, tgt, pos,
                                   img_shapes=img_shapes, avg=avg,
                                   l1_weight=cfg.bbox_weight,
                                   iou_weight=cfg.iou_weight)
  return loss_cls, loss_bbox, loss_iou


def layer_distinct_masks(distinct_masks, *, num_layers: int, num_queries: int,
                         batch: int):
  """Per-layer loss masks (L, B, Qd).  ``distinct_masks`` is None (every query
  in every layer), (L-1, B, Qd) (the decoder's masks after layers 0..L-2;
  layer 0 gets all True, as the reference) or already (L, B, Qd)."""
  ones = jnp.ones((1, batch, num_queries), bool)
  if distinct_masks is None:
    return jnp.broadcast_to(ones, (num_layers, batch, num_queries))
  distinct_masks = jnp.asarray(distinct_masks, bool)
  if distinct_masks.shape[0] == num_layers - 1:
    return jnp.concatenate([ones, distinct_masks], 0)
  assert distinct_masks.shape[0] == num_layers, distinct_masks.shape
  return distinct_masks


def ddq_criterion(all_layers_cls_scores, all_layers_bbox_preds, *,
                  distinct_masks, enc_cls_scores, enc_bbox_preds,
                  aux_enc_cls_scores, aux_enc_bbox_preds, gt_boxes,
                  gt_labels, gt_valid, img_shapes, num_dense: int,
                  cfg: CriterionConfig = CriterionConfig(),
                  dn_num_groups=None, axis_name: Optional[str] = None,
                  match_fn=None) -> Dict[str, jnp.ndarray]:
  """All DDQ-DETR training losses (``DDQDETRHead.loss``), static shapes.

  Args:
    all_layers_cls_scores: (L, B, Q, K) logits, Q = D + Qd + num_dense.
    all_layers_bbox_preds: (L, B, Q, 4) sigmoid cxcywh.
    distinct_masks: (L-1, B, Qd) or (L, B, Qd) bool or None, see
      ``layer_distinct_masks``.
    enc_cls_scores (B, Qd, K), enc_bbox_preds (B, Qd, 4): encoder top-k.
    aux_enc_cls_scores (B, Nd, K), aux_enc_bbox_preds (B, Nd, 4): dense
      encoder top-k (logits / sigmoid cxcywh).
    gt_boxes (B, G, 4) xyxy pixels of img_shape; gt_labels (B, G) int;
    gt_valid (B, G) bool; img_shapes (B, 2) real (h, w).
    num_dense: static Nd.  cfg: CriterionConfig (static).
    dn_num_groups: () int, default from gt_valid and cfg.num_dn_queries.
    axis_name: mapped axis for reduce_mean of the averaging factors.
    match_fn: Hungarian matcher override (tests).
  Returns: dict reference-key -> scalar float32 (no total; see ``total_loss``).
  """
  match_fn = match_fn or get_matcher()
  gt_boxes, gt_labels, gt_valid, img_shapes = as_gt_arrays(
      gt_boxes, gt_labels, gt_valid, img_shapes)
  num_layers, batch = all_layers_cls_scores.shape[:2]
  qd = enc_cls_scores.shape[-2]
  d = all_layers_cls_scores.shape[2] - qd - num_dense
  assert d >= 0, (all_layers_cls_scores.shape, qd, num_dense)
  dn_cls = all_layers_cls_scores[:, :, :d]
  dn_box = all_layers_bbox_preds[:, :, :d]
  cls_m = all_layers_cls_scores[:, :, d:d + qd]
  box_m = all_layers_bbox_preds[:, :, d:d + qd]
  cls_dense = all_layers_cls_scores[:, :, d + qd:]
  box_dense = all_layers_bbox_preds[:, :, d + qd:]
  masks = layer_distinct_masks(distinct_masks, num_layers=num_layers,
                               num_queries=qd, batch=batch)
  gt_kw = dict(gt_boxes=gt_boxes, gt_labels=gt_labels)

  # One-to-one matching of every decoder layer and the encoder: one call.
  all_cls = jnp.concatenate([cls_m, enc_cls_scores[None]], 0)
  all_box = jnp.concatenate([box_m, enc_bbox_preds[None]], 0)
  all_mask = jnp.concatenate([masks, jnp.ones((1, batch, qd), bool)], 0)
  cost = hungarian_cost_distinct(
      jax.lax.stop_gradient(all_cls), jax.lax.stop_gradient(all_box),
      gt_valid=gt_valid, img_shapes=img_shapes, cfg=cfg, **gt_kw)
  col_valid = jnp.broadcast_to(gt_valid[None], cost.shape[:2] + gt_valid.shape[-1:])
  assigned = match_fn(cost, row_valid=all_mask, col_valid=col_valid,
                      solver=cfg.solver)
  assigned = jnp.where(all_mask, assigned, -1)
  l_cls, l_box, l_iou = set_loss(all_cls, all_box, assigned,
                                 query_mask=all_mask, img_shapes=img_shapes,
                                 cfg=cfg, axis_name=axis_name, **gt_kw)

  losses = {}
  def put(prefix, layer_losses, names):
    for name, v in zip(names, layer_losses):
      losses[f'{prefix}{name}'] = v

  names = ('loss_cls', 'loss_bbox', 'loss_iou')
  for i in range(num_layers):
    prefix = '' if i == num_layers - 1 else f'd{i}.'
    put(prefix, (l_cls[i], l_box[i], l_iou[i]), names)
  put('enc_', (l_cls[-1], l_box[-1], l_iou[-1]), names)

  if d > 0:
    dn_c, dn_b, dn_i = dn_loss(
        dn_cls, dn_box, gt_valid=gt_valid, img_shapes=img_shapes,
        num_dn_queries=cfg.num_dn_queries, num_groups=dn_num_groups,
        focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
        cls_weight=cfg.cls_weight, l1_weight=cfg.bbox_weight,
        iou_weight=cfg.iou_weight, axis_name=axis_name, **gt_kw)
    for i in range(num_layers):
      prefix = '' if i == num_layers - 1 else f'd{i}.'
      put(prefix, (dn_c[i], dn_b[i], dn_i[i]),
          ('dn_loss_cls', 'dn_loss_bbox', 'dn_loss_iou'))

  # Dense auxiliary loss: decoder layers and the encoder, one solver call.
  dense_cls = jnp.concatenate([cls_dense, aux_enc_cls_scores[None]], 0)
  dense_box = jnp.concatenate([box_dense, aux_enc_bbox_preds[None]], 0)
  a_cls, a_box = dense_aux_loss(
      dense_cls, dense_box, gt_valid=gt_valid, img_shapes=img_shapes,
      topk=cfg.aux_num_pos, alpha=cfg.aux_alpha, beta=cfg.aux_beta,
      solver=cfg.solver, axis_name=axis_name, match_fn=match_fn, **gt_kw)
  for i in range(num_layers):
    losses[f'{i}_aux_aux_loss_cls'] = a_cls[i]
    losses[f'{i}_aux_aux_loss_bbox'] = a_box[i]
  losses['aux_enc_aux_loss_cls'] = a_cls[-1]
  losses['aux_enc_aux_loss_bbox'] = a_box[-1]
  return losses


def total_loss(losses: Dict[str, jnp.ndarray]) -> jnp.ndarray:
  """mmengine ``parse_losses``: the sum of every term whose key has 'loss'."""
  return sum(v for k, v in sorted(losses.items()) if 'loss' in k)
