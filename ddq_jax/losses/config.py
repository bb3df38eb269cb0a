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


# Fields read from ``config.loss`` under the same name.
_LOSS_FIELDS = ('focal_alpha', 'focal_gamma', 'cls_weight', 'bbox_weight',
                'iou_weight', 'match_cls_weight', 'match_bbox_weight',
                'match_iou_weight', 'aux_num_pos', 'aux_alpha', 'aux_beta')


@dataclasses.dataclass(frozen=True)
class CriterionConfig:
  """Loss hyper-parameters; hashable, so static under jit.  The values
  live in the config files only (``configs/ddq_r50_4scale.py`` ``c.loss``:
  focal alpha / gamma, the term weights cls / bbox (L1) / iou (GIoU), the
  matching costs' weights, the dense 1-to-k assignment's k = aux_num_pos
  and its alignment exponents aux_alpha / aux_beta)."""
  num_classes: int
  focal_alpha: float
  focal_gamma: float
  cls_weight: float
  bbox_weight: float
  iou_weight: float
  match_cls_weight: float
  match_bbox_weight: float
  match_iou_weight: float
  aux_num_pos: int
  aux_alpha: float
  aux_beta: float
  solver: str

  @classmethod
  def from_config(cls, c, *, num_devices: int = 1) -> 'CriterionConfig':
    """From the project's ml_collections config (``c.loss``).  The Hungarian
    solver 'auto' is resolved here for a step over ``num_devices``."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    cast = {'int': int, 'float': float}
    values = {k: cast[types[k]](c.loss[k]) for k in _LOSS_FIELDS}
    return cls(num_classes=int(c.num_classes),
               solver=resolve_solver(str(c.loss.hungarian_solver),
                                     num_devices=num_devices), **values)
