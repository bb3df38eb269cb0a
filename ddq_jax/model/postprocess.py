"""DDQ-DETR post-processing (``DDQDETRHead.predict_by_feat`` +
``DETRHead._predict_by_feat_single`` with sigmoid classification), static
shapes.

Reference: the last decoder layer's outputs of the distinct queries that the
last selection's mask marks (``distinct_query_mask[-1][img * heads][0]``,
i.e. the head's row-0 mask) are kept by boolean indexing; then the top
``max_per_img`` of the flattened sigmoid scores, ``label = idx % K``,
``box = bbox_pred[idx // K]`` cxcywh -> xyxy, scaled by img_shape (h, w),
clamped to the image, divided by ``scale_factor`` (w, h, w, h) when
rescaling.  Here the excluded queries' scores are set to -inf before the
top-k, which selects the same entries in the same order (the relative order
of the kept entries is unchanged; ties go to the lower index).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from ddq_jax.model.outputs import Detections
from ddq_jax.ops import boxes as box_ops


def _predict_one(cls_logits, bbox_preds, query_mask, img_shape, scale_factor,
                 *, max_per_img: int) -> Detections:
  """One image (``predict_by_feat`` vmaps it).

  Args:
    cls_logits: (Q, K) logits of the last decoder layer (distinct queries).
    bbox_preds: (Q, 4) sigmoid normalised cxcywh.
    query_mask: (Q,) bool, queries that count (the head's distinct mask).
    img_shape: (2,) (h, w) of the network input image (before padding).
    scale_factor: (2,) (w, h) of img_shape over the original image, or None
      for no rescale.
    max_per_img: static number of detections.
  Returns ``Detections`` of one image: boxes (M, 4) xyxy, scores (M,),
    labels (M,) int32, query_index (M,) int32, valid (M,) bool (False only
    when fewer than M candidate entries exist; the reference would fail
    there).
  """
  q, k = cls_logits.shape
  scores = jnp.where(query_mask[:, None], jax.nn.sigmoid(cls_logits),
                     -jnp.inf)
  flat = scores.reshape(-1)
  m = int(max_per_img)
  if m > flat.shape[0]:
    flat = jnp.concatenate([flat, jnp.full((m - flat.shape[0],), -jnp.inf,
                                           flat.dtype)])
  top, idx = jax.lax.top_k(flat, m)
  valid = top > -jnp.inf
  idx = idx.astype(jnp.int32)
  # idx >= 0: truncating division is the floor (no ``%`` / ``//``, whose
  # sign fix-ups ONNX exporters cannot lower on a symbolic batch)
  row = jax.lax.div(idx, jnp.int32(k))
  labels = idx - row * k
  qidx = jnp.minimum(row, q - 1)
  boxes = box_ops.cxcywh_to_xyxy(bbox_preds[qidx])
  factor = box_ops.image_size_factor(img_shape, boxes.dtype)
  boxes = jnp.clip(boxes * factor, 0.0, factor)
  if scale_factor is not None:
    sf = jnp.asarray(scale_factor).astype(boxes.dtype)
    boxes = boxes / jnp.concatenate([sf, sf])
  return Detections(boxes=boxes, scores=jnp.where(valid, top, 0.0),
                    labels=labels, valid=valid, query_index=qidx)


def predict_by_feat(cls_logits: jnp.ndarray, bbox_preds: jnp.ndarray, *,
                    query_mask: Optional[jnp.ndarray],
                    img_shapes: jnp.ndarray,
                    scale_factors: Optional[jnp.ndarray],
                    max_per_img: int) -> Detections:
  """Batched predictions from the last decoder layer.

  Args:
    cls_logits: (B, Q, K) logits of the last layer (or (L, B, Q, K): the
      last layer is taken).
    bbox_preds: (B, Q, 4) sigmoid cxcywh (or (L, B, Q, 4)).
    query_mask: (B, Q) bool, the last selection's head mask (the decoder's
      ``head_query_mask`` of the last selection; row-0 semantics by
      default), or None.
    img_shapes: (B, 2) (h, w); scale_factors: (B, 2) (w, h) or None
      (``rescale=False``).
    max_per_img: static M (config ``max_per_img``).
  Returns ``Detections``: (B, M, 4) boxes, (B, M) scores, labels, valid,
    query_index.
  """
  cls, box = cls_logits, bbox_preds
  if cls.ndim == 4:
    cls, box = cls[-1], box[-1]
  b, q = cls.shape[:2]
  if query_mask is None:
    query_mask = jnp.ones((b, q), bool)
  if scale_factors is not None:  # None (no rescale) vmaps as an empty tree
    scale_factors = jnp.asarray(scale_factors)
  return jax.vmap(functools.partial(_predict_one, max_per_img=max_per_img))(
      cls, box, query_mask, jnp.asarray(img_shapes), scale_factors)
