"""The training objective: the detector's training forward + the DDQ criterion.

    loss_fn = make_loss_fn(model, config)
    loss, aux = loss_fn(params, batch_stats, batch, rng)

``batch`` follows the data contract (ddq_jax/data): images, pad_mask,
img_shapes, gt_boxes (xyxy pixels), gt_labels, gt_valid.  ``aux`` holds
every loss term under the reference's key names.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ddq_jax.losses.criterion import CriterionConfig, ddq_criterion, total_loss


def criterion_inputs(out: dict) -> dict:
  """The head outputs of a training forward, as ``ddq_criterion`` takes them."""
  return dict(
      distinct_masks=out['head_query_mask'],
      enc_cls_scores=out['head_in_enc_outputs_class'],
      enc_bbox_preds=out['head_in_enc_outputs_coord'],
      aux_enc_cls_scores=out['head_in_aux_enc_outputs_class'],
      aux_enc_bbox_preds=out['head_in_aux_enc_outputs_coord'],
      num_dense=out['num_dense_queries'],
      dn_num_groups=out['dn_meta_num_denoising_groups'])


def forward_and_losses(model, variables: dict, batch: dict, rng: jax.Array, *,
                       cfg: CriterionConfig, dn_inject: Optional[dict] = None,
                       axis_name: Optional[str] = None,
                       compute_dtype=None) -> tuple[dict, dict]:
  """(model outputs, {loss key: scalar})."""
  images = batch['images']
  if compute_dtype is not None:
    images = images.astype(compute_dtype)
  out = model.apply(
      variables, images, batch['pad_mask'], img_shapes=batch['img_shapes'],
      train=True, gt_boxes=batch['gt_boxes'], gt_labels=batch['gt_labels'],
      gt_valid=batch['gt_valid'], dn_inject=dn_inject, dn_rng=rng,
      rngs={'dropout': jax.random.fold_in(rng, 1)})  # training: drop-path on
  cls = out['all_layers_cls_scores'].astype(jnp.float32)
  box = out['all_layers_bbox_preds'].astype(jnp.float32)
  losses = ddq_criterion(
      cls, box, gt_boxes=batch['gt_boxes'], gt_labels=batch['gt_labels'],
      gt_valid=batch['gt_valid'], img_shapes=batch['img_shapes'], cfg=cfg,
      axis_name=axis_name, **criterion_inputs(out))
  return out, losses


def make_loss_fn(model, config, *, axis_name: Optional[str] = None
                 ) -> Callable:
  """``loss_fn(params, batch_stats, batch, rng) -> (loss, losses dict)``.

  BatchNorm statistics are frozen (inference-mode BN), so ``batch_stats``
  is read, never updated.  With ``config.train.compute_dtype='bfloat16'``
  the parameters are cast for the forward; the loss stays float32.
  """
  cfg = CriterionConfig.from_config(config)
  dtype = str(config.train.get('compute_dtype', 'float32'))
  compute_dtype = jnp.bfloat16 if dtype == 'bfloat16' else None

  def loss_fn(params, batch_stats, batch, rng):
    if compute_dtype is not None:
      params = jax.tree.map(
          lambda p: p.astype(compute_dtype)
          if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    variables = {'params': params, 'batch_stats': batch_stats}
    _, losses = forward_and_losses(model, variables, batch, rng, cfg=cfg,
                                   axis_name=axis_name,
                                   compute_dtype=compute_dtype)
    return total_loss(losses), losses

  return loss_fn
