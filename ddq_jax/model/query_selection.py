"""Two-stage query selection: DDQ-DETR's ``pre_decoder``
(mmdet/models/detectors/ddq_detr.py), with static shapes.

The caller computes the encoder-level branch outputs
(``cls_branches[num_decoder_layers](output_memory)`` and
``reg_branches[num_decoder_layers](output_memory) + output_proposals``;
in training also the dense branch ``cls_branches[-1]`` / ``reg_branches[-1]``)
and hands them here with the encoder ``memory`` and the ``query_map`` layer.

Reference behaviour reproduced:
* score = sigmoid(max over classes of the logits), proposal boxes xyxy from
  sigmoid(cxcywh);
* distinct queries: class-agnostic ``batched_nms`` (IoU thr, strictly >)
  over all proposals, first ``num_queries`` survivors in score order; when
  fewer survive the rows are zero-padded (logits 0, coords_unact 0 -> box
  0.5, content query 0): ``align_tensor``;
* invalid proposals (padding, or centre outside (0.01, 0.99): +inf
  coordinates and zeroed memory) all share one box (sigmoid(+inf) = 1) and,
  from the same zero vector, one score; the NMS keeps at most one of them,
  so they enter the static candidate set as one (``nms_candidates``).
  Which of the tied positions the reference keeps depends on torch's
  unstable CPU sort; we keep the lowest index (docs/PADDING.md);
* dense queries (training): sorted by score only, first
  ``int(num_queries * dense_topk_ratio)``;
* content query = ``query_map(stop_gradient(memory))`` at the kept
  positions; decoder reference points are detached.
"""
from __future__ import annotations

from typing import Callable, Optional

from flax import struct
import jax
import jax.numpy as jnp

from ddq_jax.model.outputs import EncoderPredictions
from ddq_jax.ops import boxes as box_ops
from ddq_jax.ops import nms as nms_ops
from ddq_jax.ops.indexing import take_along_axis_in_range


@struct.dataclass
class Selected:
  """One selection of encoder positions (distinct with NMS, or dense).

  indices (B, S) int32 (-1 = padding), num_kept (B,) int32 (NMS survivors
  among the candidates), cut (B,) bool (the static candidate bound may have
  dropped a survivor: ``ops.nms.TopKAfterNms``), cls_logits (B, S, K),
  coords_unact (B, S, 4), boxes (B, S, 4) (its sigmoid: cxcywh),
  query (B, S, C) (zeros at padding, as
  ``align_tensor``; None without ``query_map``).
  """
  indices: jax.Array
  num_kept: jax.Array
  cut: jax.Array
  cls_logits: jax.Array
  coords_unact: jax.Array
  boxes: jax.Array
  query: Optional[jax.Array] = None

  @property
  def pad(self) -> jax.Array:
    return self.indices < 0


@struct.dataclass
class QuerySelection:
  """``pre_decoder``'s result.

  distinct: the NMS selection (B, Q, .); dense: the top-k by score
  (B, Qd, .), training only.  query (B, D + Q [+ Qd], C) and
  reference_points (B, D + Q [+ Qd], 4) sigmoid cxcywh (no gradient to the
  encoder branches): the decoder's inputs, [dn | distinct | dense].
  """
  distinct: Selected
  query: jax.Array
  reference_points: jax.Array
  dense: Optional[Selected] = None

  @property
  def encoder(self) -> EncoderPredictions:
    """The head's encoder-loss inputs (with gradient): logits and sigmoid
    cxcywh of the distinct and (training) dense selections."""
    dense = self.dense
    return EncoderPredictions(
        cls_logits=self.distinct.cls_logits,
        boxes=self.distinct.boxes,
        dense_cls_logits=None if dense is None else dense.cls_logits,
        dense_boxes=None if dense is None else dense.boxes)


def proposal_scores_and_boxes(enc_outputs_class: jnp.ndarray,
                              enc_outputs_coord_unact: jnp.ndarray):
  """(B, N, K) logits, (B, N, 4) unact cxcywh -> scores (B, N), xyxy (B, N, 4)
  in [0, 1] units, as ``pre_decoder`` (``max(-1)`` then sigmoid)."""
  scores = jax.nn.sigmoid(jnp.max(enc_outputs_class, axis=-1))
  boxes = box_ops.cxcywh_to_xyxy(jax.nn.sigmoid(enc_outputs_coord_unact))
  return scores, boxes


def gather_padded(x: jnp.ndarray, indices: jnp.ndarray) -> jnp.ndarray:
  """x (B, N, ...) rows at indices (B, M) (-1 = padding -> zeros): (B, M, ...)."""
  safe = jnp.maximum(indices, 0)
  out = take_along_axis_in_range(
      x, safe.reshape(safe.shape + (1,) * (x.ndim - 2)), axis=1)
  pad = (indices < 0).reshape(indices.shape + (1,) * (x.ndim - 2))
  return jnp.where(pad, jnp.zeros((), x.dtype), out)


def nms_candidates(scores: jnp.ndarray, coords_unact: jnp.ndarray, *,
                   valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Positions that may enter the distinct-query NMS: (B, N) bool.

  Every position with non-finite coordinates has the same box (xyxy of
  sigmoid(+inf) cxcywh = (0.5, 0.5, 1.5, 1.5), area 1), so the highest
  scoring of them (lowest index among equal scores) suppresses all the
  others if it is kept, and whatever suppresses it suppresses them too:
  only that one can survive, and only it needs a candidate slot.  This
  keeps thousands of invalid proposals from filling the static top-k
  while valid ones ranked below them would survive.

  Args:
    scores: (B, N) NMS scores; coords_unact: (B, N, 4) inverse-sigmoid
      cxcywh (+inf at invalid positions).
    valid: optional (B, N) bool, positions allowed in at all.
  """
  if valid is None:
    valid = jnp.ones(scores.shape, bool)
  invalid = ~jnp.all(jnp.isfinite(coords_unact), axis=-1) & valid
  rep = jnp.argmax(jnp.where(invalid, scores, -jnp.inf), axis=-1)
  is_rep = jnp.arange(scores.shape[-1])[None, :] == rep[:, None]
  return valid & (~invalid | (is_rep & jnp.any(invalid, -1, keepdims=True)))


def select_queries(enc_outputs_class: jnp.ndarray,
                   enc_outputs_coord_unact: jnp.ndarray,
                   memory: jnp.ndarray, *,
                   query_map: Optional[Callable[[jnp.ndarray], jnp.ndarray]],
                   num_select: int,
                   iou_threshold: Optional[float],
                   pre_topk: int,
                   valid: Optional[jnp.ndarray] = None,
                   nms_method: str = 'auto') -> Selected:
  """One selection (distinct with NMS, or dense with ``iou_threshold=None``).

  Args:
    enc_outputs_class: (B, N, K) class logits.
    enc_outputs_coord_unact: (B, N, 4) inverse-sigmoid cxcywh (may be +inf).
    memory: (B, N, C) encoder output (``query_map``'s input).
    query_map: callable (..., C) -> (..., C) (the detector's ``query_map``
      Dense), or None to skip the content queries.
    num_select: static number of output queries.
    iou_threshold: NMS IoU threshold, None = sort by score only.
    pre_topk: static NMS candidate count (see ``ops.nms.topk_after_nms``).
    valid: optional (B, N) bool, positions allowed to be selected (the
      reference lets every position in, padding included: default).
  Returns:
    ``Selected`` (S = num_select).
  """
  scores, boxes = proposal_scores_and_boxes(
      jax.lax.stop_gradient(enc_outputs_class),
      jax.lax.stop_gradient(enc_outputs_coord_unact))
  if iou_threshold is not None:
    valid = nms_candidates(scores, enc_outputs_coord_unact, valid=valid)
  indices, num_kept, cut = nms_ops.topk_after_nms(
      boxes, scores, iou_threshold=iou_threshold, pre_topk=pre_topk,
      num_keep=num_select, valid=valid, method=nms_method)
  pad = indices < 0
  cls_logits = gather_padded(enc_outputs_class, indices)
  coords_unact = gather_padded(enc_outputs_coord_unact, indices)
  query = None
  if query_map is not None:
    query = query_map(gather_padded(jax.lax.stop_gradient(memory), indices))
    query = jnp.where(pad[..., None], 0.0, query).astype(query.dtype)
  return Selected(indices=indices, num_kept=num_kept, cut=cut,
                  cls_logits=cls_logits, coords_unact=coords_unact,
                  boxes=jax.nn.sigmoid(coords_unact), query=query)


def num_dense_queries(*, num_queries: int, dense_topk_ratio: float) -> int:
  """``int(num_queries * dense_topk_ratio)`` as the reference."""
  return int(num_queries * dense_topk_ratio)


def pre_decoder(enc_outputs_class: jnp.ndarray,
                enc_outputs_coord_unact: jnp.ndarray,
                memory: jnp.ndarray, *,
                query_map: Callable[[jnp.ndarray], jnp.ndarray],
                num_queries: int,
                iou_threshold: float,
                pre_topk: int,
                dense_enc_outputs_class: Optional[jnp.ndarray] = None,
                dense_enc_outputs_coord_unact: Optional[jnp.ndarray] = None,
                dense_topk_ratio: float = 1.5,
                dn_label_query: Optional[jnp.ndarray] = None,
                dn_bbox_query: Optional[jnp.ndarray] = None,
                valid: Optional[jnp.ndarray] = None,
                nms_method: str = 'auto') -> QuerySelection:
  """DDQ-DETR ``pre_decoder`` after the branch outputs.

  Eval mode: leave ``dense_*`` and ``dn_*`` None.  Training: pass the dense
  branch outputs (B, N, K) / (B, N, 4) and the denoising queries
  (``dn_label_query`` (B, D, C), ``dn_bbox_query`` (B, D, 4) inverse-sigmoid,
  from ``models.denoising``); the layout is then [dn | distinct | dense].

  Returns:
    ``QuerySelection``: the distinct (B, Q) and, training only, dense
    (B, Qd) selections, Qd = min(int(num_queries * dense_topk_ratio), N),
    and the decoder's queries and reference points.
  """
  dist = select_queries(enc_outputs_class, enc_outputs_coord_unact, memory,
                        query_map=query_map, num_select=num_queries,
                        iou_threshold=iou_threshold, pre_topk=pre_topk,
                        valid=valid, nms_method=nms_method)
  query, coords_unact, dense = dist.query, dist.coords_unact, None
  if dense_enc_outputs_class is not None:  # training
    n_dense = min(num_dense_queries(num_queries=num_queries,
                                    dense_topk_ratio=dense_topk_ratio),
                  enc_outputs_class.shape[1])
    dense = select_queries(dense_enc_outputs_class,
                           dense_enc_outputs_coord_unact, memory,
                           query_map=query_map, num_select=n_dense,
                           iou_threshold=None, pre_topk=n_dense,
                           valid=valid, nms_method=nms_method)
    query = jnp.concatenate([query, dense.query], axis=1)
    coords_unact = jnp.concatenate([coords_unact, dense.coords_unact],
                                   axis=1)
  coords_unact = jax.lax.stop_gradient(coords_unact)
  if dn_label_query is not None:
    query = jnp.concatenate([dn_label_query.astype(query.dtype), query],
                            axis=1)
    coords_unact = jnp.concatenate(
        [dn_bbox_query.astype(coords_unact.dtype), coords_unact], axis=1)
  return QuerySelection(distinct=dist, dense=dense, query=query,
                        reference_points=jax.nn.sigmoid(coords_unact))
