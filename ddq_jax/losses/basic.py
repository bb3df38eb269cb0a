"""Elementary losses of mmdet 3.3.0, as pure jnp functions.

Convention: the loss functions return *unreduced* (elementwise or per-row)
losses already multiplied by their ``weight``; the caller sums them and
divides by the average factor with ``reduce_with_avg_factor`` (which
reproduces mmdet's ``weight_reduce_loss``: ``sum / (avg_factor + eps_f32)``).
The average factor itself comes from ``avg_factor`` (mmdet's
``reduce_mean(x).clamp(min=1)``: ``jax.lax.pmean`` over ``axis_name`` when
given, i.e. inside ``shard_map``/``pmap``; under plain ``jit`` with global
arrays just pass the global count and no axis name). ``loss_weight``s of the
reference modules are applied by the caller.

Reference functions:
- ``sigmoid_focal_loss``: models/losses/focal_loss.py ``py_sigmoid_focal_loss``
  (what ``FocalLoss`` runs on CPU; mmcv's CUDA kernel computes the same).
- ``l1_loss``: models/losses/smooth_l1_loss.py ``l1_loss``.
- ``giou_loss``: models/losses/iou_loss.py ``giou_loss`` with ``GIoULoss``'s
  eps 1e-6 and its (n, 4) weight -> mean(-1).
- ``quality_focal_loss``: models/losses/gfocal_loss.py ``quality_focal_loss``
  (logits) and, with ``activated=True``, ``quality_focal_loss_with_prob``
  (probabilities; this is what ``DDQAuxLoss`` uses:
  ``QualityFocalLoss(activated=True, beta=2.0)`` fed ``cls_scores.sigmoid()``).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.ops.boxes import aligned_giou

# torch.finfo(torch.float32).eps, added to avg_factor by weight_reduce_loss.
EPS_F32 = float(np.finfo(np.float32).eps)


def _row_weight(weight, loss):
  """Broadcast a per-row (N,) weight over (N, K) as mmdet's view(-1, 1)."""
  if weight is None:
    return loss
  weight = jnp.asarray(weight, loss.dtype)
  if weight.ndim == loss.ndim - 1:
    weight = weight[..., None]
  return loss * weight


def bce_with_logits(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """torch ``F.binary_cross_entropy_with_logits(reduction='none')``:
  max(x, 0) - x t + log1p(exp(-|x|))."""
  return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _bce_prob(p, t):
  log_p = jnp.maximum(jnp.log(p), -100.0)
  log_1mp = jnp.maximum(jnp.log(1 - p), -100.0)
  return -(t * log_p + (1 - t) * log_1mp)


@jax.custom_vjp
def binary_cross_entropy(p: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """torch ``F.binary_cross_entropy(reduction='none')`` on probabilities:
  -(t log p + (1 - t) log(1 - p)) with each log clamped to >= -100.

  Gradient as torch's backward: d/dp = (p - t) / max(p (1 - p), 1e-12)
  (finite at p = 0 or 1, where a sigmoid saturates in float32)."""
  return _bce_prob(p, t)


def _bce_fwd(p, t):
  return _bce_prob(p, t), (p, t)


def _bce_bwd(res, g):
  p, t = res
  gp = g * (p - t) / jnp.maximum(p * (1 - p), 1e-12)
  log_p = jnp.maximum(jnp.log(p), -100.0)
  log_1mp = jnp.maximum(jnp.log(1 - p), -100.0)
  gt = g * (log_1mp - log_p)
  return gp, gt


binary_cross_entropy.defvjp(_bce_fwd, _bce_bwd)


def sigmoid_focal_loss(logits: jnp.ndarray, targets_onehot: jnp.ndarray, *,
                       weight: Optional[jnp.ndarray] = None,
                       alpha: float = 0.25, gamma: float = 2.0) -> jnp.ndarray:
  """Elementwise sigmoid focal loss, (N, K) -> (N, K).

  ``targets_onehot`` (N, K) float: one-hot of the label with the background
  column dropped (a background row is all zeros). ``weight``: (N,) per-row
  (e.g. ``label_weights``) or (N, K). Sum it and divide by the average
  factor; multiply by ``loss_weight``.
  """
  t = targets_onehot.astype(logits.dtype)
  p = jax.nn.sigmoid(logits)
  pt = (1 - p) * t + p * (1 - t)
  focal_weight = (alpha * t + (1 - alpha) * (1 - t)) * jnp.power(pt, gamma)
  loss = bce_with_logits(logits, t) * focal_weight
  return _row_weight(weight, loss)


def labels_to_onehot(labels: jnp.ndarray, num_classes: int,
                     dtype=jnp.float32) -> jnp.ndarray:
  """(N,) int labels -> (N, K) one-hot; labels outside [0, K) (background
  ``K`` or -1) give an all-zero row (mmdet's one_hot(K + 1)[:, :K])."""
  return (labels[..., None] == jnp.arange(num_classes)).astype(dtype)


def l1_loss(pred: jnp.ndarray, target: jnp.ndarray, *,
            weight: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Elementwise |pred - target| (N, 4), times ``weight`` ((N, 4) or (N,)).

  Written ``d * sign(d)``: the same value, and torch's gradient ``sign(d)``,
  0 where pred equals target (``jnp.abs`` gives 1 there)."""
  d = pred - target
  loss = d * jnp.sign(d)
  return _row_weight(weight, loss)


def giou_loss(pred_xyxy: jnp.ndarray, target_xyxy: jnp.ndarray, *,
              weight: Optional[jnp.ndarray] = None,
              eps: float = 1e-6) -> jnp.ndarray:
  """Per-box 1 - GIoU, (N, 4) x (N, 4) -> (N,), times ``weight``.

  ``weight`` (N,) or (N, 4) (then averaged over the last axis, as
  ``GIoULoss`` does with DETR's ``bbox_weights``). ``GIoULoss`` defaults to
  eps 1e-6 (the bare ``giou_loss`` function to 1e-7).
  """
  loss = 1 - aligned_giou(pred_xyxy, target_xyxy, eps=eps)
  if weight is not None:
    weight = jnp.asarray(weight, loss.dtype)
    if weight.ndim == loss.ndim + 1:
      weight = weight.mean(-1)
    loss = loss * weight
  return loss


def quality_focal_loss(pred: jnp.ndarray, labels: jnp.ndarray,
                       scores: jnp.ndarray, *,
                       weight: Optional[jnp.ndarray] = None,
                       beta: float = 2.0,
                       activated: bool = False) -> jnp.ndarray:
  """Quality focal loss per row, (N, K) -> (N,), times ``weight`` (N,).

  Args:
    pred: (N, K) logits (``activated=False``, ``quality_focal_loss``) or
      probabilities (``activated=True``, ``quality_focal_loss_with_prob``,
      the variant ``DDQAuxLoss`` uses, with torch's BCE log clamp at -100).
    labels: (N,) int; a row is positive when 0 <= label < K (background is
      K, -1 also counts as negative).
    scores: (N,) float quality target of the positive class.

  Negatives: BCE(pred, 0) * sigma^beta on every class; a positive row's
  label column becomes BCE(pred, score) * |score - sigma|^beta.
  """
  num_classes = pred.shape[-1]
  if activated:
    sig = pred
    bce = binary_cross_entropy
  else:
    sig = jax.nn.sigmoid(pred)
    bce = bce_with_logits
  neg = bce(pred, jnp.zeros_like(pred)) * jnp.power(sig, beta)
  labels = labels.astype(jnp.int32)
  pos_row = (labels >= 0) & (labels < num_classes)
  onehot = (labels[:, None] == jnp.arange(num_classes)) & pos_row[:, None]
  score = scores.astype(pred.dtype)[:, None]
  pos = bce(pred, jnp.broadcast_to(score, pred.shape)) * jnp.power(
      jnp.abs(score - sig), beta)
  loss = jnp.where(onehot, pos, neg).sum(-1)
  if weight is not None:
    loss = loss * jnp.asarray(weight, loss.dtype)
  return loss


def as_gt_arrays(gt_boxes, gt_labels, gt_valid, img_shapes):
  """numpy or jax ground truth -> jnp (float32 boxes, int32 labels, bool
  valid, img_shapes as given)."""
  return (jnp.asarray(gt_boxes, jnp.float32), jnp.asarray(gt_labels, jnp.int32),
          jnp.asarray(gt_valid, bool), jnp.asarray(img_shapes))


def avg_factor(value: jnp.ndarray, *, axis_name: Optional[str] = None,
               min_value: float = 1.0) -> jnp.ndarray:
  """mmdet's ``reduce_mean(value).clamp(min=min_value)``: the mean over the
  devices of ``axis_name`` (``jax.lax.pmean``) when given, then clamped."""
  value = jnp.asarray(value, jnp.float32)
  if axis_name is not None:
    value = jax.lax.pmean(value, axis_name)
  return jnp.maximum(value, min_value)


def reduce_with_avg_factor(loss_sum: jnp.ndarray,
                           factor: jnp.ndarray) -> jnp.ndarray:
  """``weight_reduce_loss(reduction='mean', avg_factor=factor)`` of a summed
  loss: ``loss_sum / (factor + eps_f32)``."""
  return loss_sum / (factor + EPS_F32)
