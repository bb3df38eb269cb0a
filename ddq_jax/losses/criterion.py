"""DDQ-DETR training criterion: mmdet 3.3.0 ``DDQDETRHead.loss`` /
``loss_by_feat`` as one pure, jit-able function of the detector's
``DetectorOutputs`` (``models/outputs.py``), with static shapes.

Query layout of the head outputs (``outputs.layout``, Q = D + Qd + Nd):
  [0, D)          denoising slots (the used ones are a prefix; their
                  targets are ``outputs.denoising``), -> ``dn_loss.py``;
  [D, D + Qd)     distinct queries, 1-to-1 Hungarian -> ``set_loss.py``;
  [D + Qd, Q)     dense queries, 1-to-k -> ``dense_aux.py``.

Terms (keys exactly as the reference's loss dict; ``d{i}.`` = decoder layer
i < L-1, unprefixed = last layer):
  loss_cls/bbox/iou, d{i}.loss_*     distinct queries, focal + L1 + GIoU;
  enc_loss_*                         encoder top-k queries (real labels);
  dn_loss_*, d{i}.dn_loss_*          denoising queries;
  {l}_aux_aux_loss_cls/bbox          dense queries of decoder layer l
                                     (1-to-k, QFL + GIoU, summed over images);
  aux_enc_aux_loss_cls/bbox          dense encoder top-k queries.

Distinct-query masks: the head uses, for decoder layer l > 0, the mask left
by layer l-1's distinct-query NMS (``outputs.distinct_masks``); layer 0 uses
every query.  Non-distinct queries are unmatchable and carry zero loss
weight, which equals the reference's boolean-indexed computation.
"""
from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp

from ddq_jax.losses import basic
from ddq_jax.losses.config import CriterionConfig
from ddq_jax.losses.dense_aux import dense_aux_loss
from ddq_jax.losses.dn_loss import dn_assignment
from ddq_jax.losses.hungarian import hungarian_match_batched
from ddq_jax.losses.set_loss import distinct_match_cost, set_loss
from ddq_jax.model.outputs import DetectorOutputs
from ddq_jax.ops.xla_cpu import merged_call


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


def _layer_prefix(i: int, num_layers: int) -> str:
  return '' if i == num_layers - 1 else f'd{i}.'


def ddq_criterion(outputs: DetectorOutputs, *, gt_boxes, gt_labels, gt_valid,
                  img_shapes, cfg: CriterionConfig,
                  axis_name: Optional[str] = None) -> Dict[str, jnp.ndarray]:
  """All DDQ-DETR training losses (``DDQDETRHead.loss``), static shapes.

  Args:
    outputs: a training forward's ``DetectorOutputs`` (``encoder`` and
      ``denoising`` set); logits and boxes are read in float32.
    gt_boxes (B, G, 4) xyxy pixels of img_shape; gt_labels (B, G) int;
    gt_valid (B, G) bool; img_shapes (B, 2) real (h, w).
    cfg: CriterionConfig (static).
    axis_name: mapped axis for the averaging factors' device mean.
  Returns: dict reference-key -> scalar float32 (no total; see ``total_loss``).
  """
  gt_boxes, gt_labels, gt_valid, img_shapes = basic.as_gt_arrays(
      gt_boxes, gt_labels, gt_valid, img_shapes)
  gt = dict(gt_boxes=gt_boxes, gt_labels=gt_labels, gt_valid=gt_valid,
            img_shapes=img_shapes)
  layout, enc = outputs.layout, outputs.encoder
  cls_all, box_all = _f32(outputs.cls_logits), _f32(outputs.boxes)
  num_layers, batch = cls_all.shape[:2]
  masks = layer_distinct_masks(outputs.distinct_masks, num_layers=num_layers,
                               num_queries=layout.num_distinct, batch=batch)
  l_cls, l_box, l_iou = _set_losses(outputs, cls_all, box_all, masks, gt,
                                    cfg=cfg, axis_name=axis_name)
  losses = {}
  names = ('loss_cls', 'loss_bbox', 'loss_iou')
  for i in range(num_layers):
    losses.update(_named(_layer_prefix(i, num_layers), names,
                         (l_cls[i], l_box[i], l_iou[i])))
  losses.update(_named('enc_', names, (l_cls[num_layers], l_box[num_layers],
                                       l_iou[num_layers])))
  if layout.num_dn > 0:
    for i in range(num_layers):
      j = num_layers + 1 + i
      losses.update(_named(_layer_prefix(i, num_layers),
                           ('dn_loss_cls', 'dn_loss_bbox', 'dn_loss_iou'),
                           (l_cls[j], l_box[j], l_iou[j])))

  # Dense auxiliary loss: decoder layers and the encoder, one solver call.
  dense_cls = jnp.concatenate([cls_all[:, :, layout.dense],
                               _f32(enc.dense_cls_logits)[None]], 0)
  dense_box = jnp.concatenate([box_all[:, :, layout.dense],
                               _f32(enc.dense_boxes)[None]], 0)
  a_cls, a_box = dense_aux_loss(
      dense_cls, dense_box, topk=cfg.aux_num_pos, alpha=cfg.aux_alpha,
      beta=cfg.aux_beta, match_cls_weight=cfg.match_cls_weight,
      match_l1_weight=cfg.match_bbox_weight,
      match_iou_weight=cfg.match_iou_weight, solver=cfg.solver,
      axis_name=axis_name, **gt)
  for i in range(num_layers):
    losses[f'{i}_aux_aux_loss_cls'] = a_cls[i]
    losses[f'{i}_aux_aux_loss_bbox'] = a_box[i]
  losses['aux_enc_aux_loss_cls'] = a_cls[-1]
  losses['aux_enc_aux_loss_bbox'] = a_box[-1]
  return losses


def _f32(x):
  return x.astype(jnp.float32)


def _named(prefix: str, names, values) -> dict:
  return {f'{prefix}{name}': v for name, v in zip(names, values)}


def _set_losses(outputs: DetectorOutputs, cls_all, box_all, masks, gt: dict,
                *, cfg: CriterionConfig, axis_name):
  """(loss_cls, loss_bbox, loss_iou), each (L + 1 [+ L],): the one-to-one
  losses of every decoder layer and the encoder (one Hungarian call), then
  the denoising queries' (fixed assignment), as one ``set_loss`` call."""
  layout, enc = outputs.layout, outputs.encoder
  gt_kw = dict(gt_boxes=gt['gt_boxes'], gt_labels=gt['gt_labels'])
  gt_valid, img_shapes = gt['gt_valid'], gt['img_shapes']
  batch, qd = cls_all.shape[1], layout.num_distinct
  all_cls = jnp.concatenate([cls_all[:, :, layout.distinct],
                             _f32(enc.cls_logits)[None]], 0)
  all_box = jnp.concatenate([box_all[:, :, layout.distinct],
                             _f32(enc.boxes)[None]], 0)
  all_mask = jnp.concatenate([masks, jnp.ones((1, batch, qd), bool)], 0)
  cost = distinct_match_cost(
      jax.lax.stop_gradient(all_cls), jax.lax.stop_gradient(all_box),
      gt_valid=gt_valid, img_shapes=img_shapes, cfg=cfg, **gt_kw)
  assigned = hungarian_match_batched(cost, row_valid=all_mask,
                                     col_valid=gt_valid[None],
                                     solver=cfg.solver)
  assigned = jnp.where(all_mask, assigned, -1)
  sets = [(all_cls, all_box, assigned, all_mask)]
  if layout.num_dn > 0:
    dn_cls, dn_box = cls_all[:, :, layout.dn], box_all[:, :, layout.dn]
    sets.append((dn_cls, dn_box) + dn_assignment(
        outputs.denoising, lead=dn_cls.shape[:-1]))
  # The distinct (+ encoder) and denoising set losses as one call: their
  # query axes padded to one length (padding: masked, unassigned), the
  # sets stacked on the layer axis; each row keeps its own sums and
  # average factor.
  return merged_call(
      lambda cls, box, assigned, mask: set_loss(
          cls, box, assigned, query_mask=mask, img_shapes=img_shapes,
          cfg=cfg, axis_name=axis_name, **gt_kw),
      sets, (0, 0, -1, False), axis=2)


def total_loss(losses: Dict[str, jnp.ndarray]) -> jnp.ndarray:
  """mmengine ``parse_losses``: the sum of every term whose key has 'loss'."""
  return sum(v for k, v in sorted(losses.items()) if 'loss' in k)
