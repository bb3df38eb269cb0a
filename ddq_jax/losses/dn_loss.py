"""Denoising (CDN) losses (mmdet ``DINOHead.loss_dn``), static shapes.

The assignment is fixed by the slot layout that ``models/denoising.py``
(``dn_layout``) computed for the forward pass and the detector handed over
in ``DetectorOutputs.denoising``: a slot in the used prefix reconstructs
ground-truth slot ``gt_index`` when ``positive``, else it is background.
The losses are then the one-to-one set losses of ``set_loss.py`` over the
used slots.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from ddq_jax.losses.set_loss import set_loss
from ddq_jax.models.outputs import DenoisingTargets


def dn_loss(dn_cls_scores, dn_bbox_preds, denoising: DenoisingTargets, *,
            gt_boxes, gt_labels, img_shapes, cfg,
            axis_name: Optional[str] = None):
  """Denoising losses of every decoder layer.

  Args:
    dn_cls_scores: (L, B, D, K) logits of the D static denoising slots.
    dn_bbox_preds: (L, B, D, 4) sigmoid cxcywh.
    denoising: the slots' targets (gt_index, positive (B, D); slot_in_range
      (D,)).
    gt_boxes (B, G, 4) xyxy px; gt_labels (B, G); img_shapes (B, 2) (h, w);
    cfg: ``CriterionConfig``.
  Returns: (loss_cls, loss_bbox, loss_iou), each (L,).
  """
  lead = dn_cls_scores.shape[:-1]                      # (L, B, D)
  assigned = jnp.where(denoising.positive, denoising.gt_index, -1)
  query_mask = jnp.broadcast_to(denoising.slot_in_range, lead)
  return set_loss(dn_cls_scores, dn_bbox_preds,
                  jnp.broadcast_to(assigned, lead), query_mask=query_mask,
                  gt_boxes=gt_boxes, gt_labels=gt_labels,
                  img_shapes=img_shapes, cfg=cfg, axis_name=axis_name)
