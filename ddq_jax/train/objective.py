"""The training objective: the detector's training forward + the DDQ criterion.

    loss_fn = make_loss_fn(model, config)
    loss, losses = loss_fn(params, batch_stats, batch, rng)

``batch`` follows the data contract (ddq_jax/data): images, pad_mask,
img_shapes, gt_boxes (xyxy pixels), gt_labels, gt_valid.  ``losses`` holds
every loss term under the reference's key names, and ``encoder_nms_cut``
(not a loss).  Mixed precision is not
applied here: ``training/step.py`` casts the parameters and images once.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ddq_jax.losses.config import CriterionConfig
from ddq_jax.losses.criterion import ddq_criterion, total_loss
from ddq_jax.model.detector import INTERMEDIATES
from ddq_jax.model.outputs import DetectorOutputs

# The training metric counting images whose encoder-level NMS may have been
# cut short by ``nms_pre_topk`` (0 means the selection is the reference's).
NMS_CUT_METRIC = 'encoder_nms_cut'


def forward_and_losses(model, variables: dict, batch: dict, rng: jax.Array, *,
                       cfg: CriterionConfig, dn_inject: Optional[dict] = None,
                       axis_name: Optional[str] = None,
                       capture_intermediates: bool = False
                       ) -> tuple[dict, DetectorOutputs, Optional[dict]]:
  """(losses {key: scalar}, the forward's outputs, intermediates).

  ``capture_intermediates=True`` also returns the parity intermediates the
  detector sows (fixture names -> arrays; ``verify`` uses it); otherwise
  None, and the forward keeps nothing else alive.
  """
  kwargs = dict(img_shapes=batch['img_shapes'], train=True,
                gt_boxes=batch['gt_boxes'], gt_labels=batch['gt_labels'],
                gt_valid=batch['gt_valid'], dn_inject=dn_inject, dn_rng=rng,
                rngs={'dropout': jax.random.fold_in(rng, 1)})  # drop-path on
  intermediates = None
  if capture_intermediates:
    out, state = model.apply(variables, batch['images'], batch['pad_mask'],
                             mutable=[INTERMEDIATES], **kwargs)
    intermediates = dict(state[INTERMEDIATES])
  else:
    out = model.apply(variables, batch['images'], batch['pad_mask'], **kwargs)
  losses = ddq_criterion(
      out, gt_boxes=batch['gt_boxes'], gt_labels=batch['gt_labels'],
      gt_valid=batch['gt_valid'], img_shapes=batch['img_shapes'], cfg=cfg,
      axis_name=axis_name)
  # Not a loss (no 'loss' in the key, so total_loss skips it): the images
  # whose encoder NMS may have lost a survivor to the static candidate bound.
  losses[NMS_CUT_METRIC] = jnp.sum(out.encoder_nms_cut.astype(jnp.float32))
  return losses, out, intermediates


def make_loss_fn(model, config, *, num_devices: int = 1,
                 axis_name: Optional[str] = None) -> Callable:
  """``loss_fn(params, batch_stats, batch, rng) -> (loss, losses dict)``.

  BatchNorm statistics are frozen (inference-mode BN), so ``batch_stats``
  is read, never updated.  ``num_devices``: the devices of the step's mesh
  (resolves ``loss.hungarian_solver='auto'``).
  """
  cfg = CriterionConfig.from_config(config, num_devices=num_devices)

  def loss_fn(params, batch_stats, batch, rng):
    variables = {'params': params, 'batch_stats': batch_stats}
    losses, _, _ = forward_and_losses(model, variables, batch, rng, cfg=cfg,
                                      axis_name=axis_name)
    return total_loss(losses), losses

  loss_fn.criterion_config = cfg
  return loss_fn
