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
from jax.sharding import Mesh, PartitionSpec as P

from ddq_jax.losses.config import CriterionConfig
from ddq_jax.losses.criterion import ddq_criterion, total_loss
from ddq_jax.model.detector import INTERMEDIATES
from ddq_jax.model.outputs import DetectorOutputs
from ddq_jax.train.parallel.mesh import DATA, MODEL

# The training metric counting images whose encoder-level NMS may have been
# cut short by ``nms_pre_topk`` (0 means the selection is the reference's).
NMS_CUT_METRIC = 'encoder_nms_cut'


def forward_and_losses(model, variables: dict, batch: dict, rng: jax.Array, *,
                       cfg: CriterionConfig, dn_inject: Optional[dict] = None,
                       axis_name: Optional[str] = None,
                       capture_intermediates: bool = False
                       ) -> tuple[dict, DetectorOutputs, Optional[dict]]:
  """(losses {key: scalar}, the forward's outputs, intermediates).

  ``capture_intermediates=True`` also returns the stage outputs the
  detector sows ({stage: typed output}, ``model/outputs.py``; ``verify``
  names them as the fixtures do with ``parity.fixture_names``); otherwise
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
                 mesh: Optional[Mesh] = None) -> Callable:
  """``loss_fn(params, batch_stats, batch, rng) -> (loss, losses dict)``.

  BatchNorm statistics are frozen (inference-mode BN), so ``batch_stats``
  is read, never updated.  ``num_devices``: the devices of the step's mesh
  (resolves ``loss.hungarian_solver='auto'``; default: ``mesh``'s size).

  ``mesh``: the step's mesh.  When its 'data' axis holds more than one
  device, the loss runs per shard as the reference's DDP runs it per GPU
  (``make_device_losses``): the returned loss and terms are the devices'
  means, so the gradient is DDP's mean of the per-device gradients.
  Without a mesh (or with one device on 'data') the loss is the whole
  batch's, as on one device (jit partitions it automatically).
  """
  if mesh is not None and num_devices == 1:
    num_devices = int(mesh.devices.size)
  cfg = CriterionConfig.from_config(config, num_devices=num_devices)
  if mesh is not None and int(mesh.shape[DATA]) > 1:
    if cfg.solver == 'scipy' and int(mesh.shape.get(MODEL, 1)) > 1:
      raise ValueError("loss.hungarian_solver='scipy' needs a mesh without "
                       "a 'model' axis (host callbacks run only where every "
                       "axis is manual); use 'jax'")
    per_device = make_device_losses(model, cfg=cfg, mesh=mesh)

    def sharded_loss_fn(params, batch_stats, batch, rng):
      losses, _ = per_device(params, batch_stats, batch, rng)
      return mean_over_devices(losses)

    sharded_loss_fn.criterion_config = cfg
    sharded_loss_fn.per_device = per_device
    return sharded_loss_fn

  def loss_fn(params, batch_stats, batch, rng):
    variables = {'params': params, 'batch_stats': batch_stats}
    losses, _, _ = forward_and_losses(model, variables, batch, rng, cfg=cfg)
    return total_loss(losses), losses

  loss_fn.criterion_config = cfg
  return loss_fn


# The denoising layout each device reports (``make_device_losses``).
DN_LAYOUT_KEYS = ('num_groups', 'num_queries', 'slot_in_range', 'positive')


def make_device_losses(model, *, cfg: CriterionConfig, mesh: Mesh
                       ) -> Callable:
  """The loss of each device's own images: ``jax.shard_map`` over 'data'.

  ``fn(params, batch_stats, batch, rng, dn_inject=None) -> (losses, dn)``:
  ``losses`` {key: (N,)} every term of each of the N devices of 'data',
  ``dn`` {DN_LAYOUT_KEYS: (N, ...)} each device's denoising layout
  (``DenoisingTargets``' fields; ``positive`` (B, D) of its images).

  Inside, each device runs the forward, query selection, denoising,
  matching and every loss term on its B/N images, as one GPU of the
  reference's DDP: the denoising groups and slots follow the device's
  largest gt count; the normalisers are the devices' means (``axis_name``,
  mmdet's ``reduce_mean``); the noise and drop-path keys are ``rng`` folded
  with the device's index.  The parameters enter replicated, so the only
  collectives are the normalisers' means here and, in the gradient, the
  parameters' cotangent sum.  A 'model' axis of more than one device stays
  automatic (then without host callbacks: the 'jax' Hungarian solver).
  ``check_vma=False``: the ops' custom gradients (ops/conv.py, ops/boxes.py)
  return a device's own cotangent for a replicated parameter; shard_map's
  transpose sums those over 'data' at its boundary.
  """

  def local(params, batch_stats, batch, rng, dn_inject):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA))
    variables = {'params': params, 'batch_stats': batch_stats}
    losses, out, _ = forward_and_losses(model, variables, batch, rng, cfg=cfg,
                                        dn_inject=dn_inject, axis_name=DATA)
    dn = ({k: getattr(out.denoising, k) for k in DN_LAYOUT_KEYS}
          if out.denoising is not None else {})
    return jax.tree.map(lambda x: jnp.asarray(x)[None], (losses, dn))

  # Every axis manual when 'model' has one device (host callbacks, the
  # scipy solver's, need that); else 'model' stays automatic.
  manual = set(mesh.axis_names) if int(mesh.shape.get(MODEL, 1)) == 1 \
      else {DATA}

  def fn(params, batch_stats, batch, rng, dn_inject=None):
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P(DATA), P(), P(DATA)),
        out_specs=P(DATA), axis_names=manual, check_vma=False)(
            params, batch_stats, batch, rng, dn_inject)
  return fn


def mean_over_devices(losses: dict) -> tuple[jax.Array, dict]:
  """(loss, terms) of per-device terms {key: (N,)}: each term's mean over
  the devices (``NMS_CUT_METRIC``, a count of images: their sum), and the
  total of the means (= the mean of the devices' totals)."""
  terms = {k: (jnp.sum(v) if k == NMS_CUT_METRIC else jnp.mean(v))
           for k, v in losses.items()}
  return total_loss(terms), terms
