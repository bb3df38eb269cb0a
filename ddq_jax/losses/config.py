"""The criterion's hyper-parameters, read once from the project config.

``CriterionConfig.from_config(config, num_devices=...)`` is the only reader
of ``config.loss`` / ``config.dn`` for the losses; the matching weights
``loss.match_*`` serve the one-to-one matching (distinct and encoder
queries) and the dense queries' 1-to-k matching alike, as in the DDQ
configs (``FocalLossCost(2)``, ``BBoxL1Cost(5)``, ``IoUCost(giou, 2)``).
"""
from __future__ import annotations

import dataclasses

from ddq_jax.losses.hungarian import resolve_solver


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
  solver: str = 'scipy'

  @classmethod
  def from_config(cls, c, *, num_devices: int = 1) -> 'CriterionConfig':
    """From the project's ml_collections config (``c.loss``).  The Hungarian
    solver 'auto' is resolved here for a step over ``num_devices``."""
    loss = c.loss
    return cls(
        num_classes=int(c.num_classes),
        focal_alpha=float(loss.focal_alpha),
        focal_gamma=float(loss.focal_gamma),
        cls_weight=float(loss.cls_weight),
        bbox_weight=float(loss.bbox_weight),
        iou_weight=float(loss.iou_weight),
        match_cls_weight=float(loss.match_cls_weight),
        match_bbox_weight=float(loss.match_bbox_weight),
        match_iou_weight=float(loss.match_iou_weight),
        aux_num_pos=int(loss.aux_num_pos),
        aux_alpha=float(loss.aux_alpha),
        aux_beta=float(loss.aux_beta),
        solver=resolve_solver(str(loss.hungarian_solver),
                              num_devices=num_devices))
