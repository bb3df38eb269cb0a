"""Static-shape exact greedy NMS, as mmcv 2.1.0's ``batched_nms`` / ``nms``.

What the reference computes (mmcv/ops/nms.py + csrc/pytorch/cpu/nms.cpp):

* ``batched_nms(boxes, scores, idxs=ones, nms_cfg)`` is *not* class agnostic,
  so it shifts every box by ``idxs * (boxes.max() + 1)`` = ``boxes.max() + 1``
  before the NMS (``boxes.max()`` over all 4 coordinates of the boxes it is
  given).  The shift changes the float32 IoU arithmetic, so we reproduce it
  (``batched_offset=True``).
* The kernel sorts the scores descending (ours keeps the index order for
  ties; torch's CPU sort in ``nms_cpu`` is not stable, so exact ties may
  come out in another order there: docs/PADDING.md), then for each
  still-selected box ``i`` in that order
  drops every later box ``j`` with ``inter / (area_i + area_j - inter) > thr``
  (float32, strictly greater, no eps; ``area = (x2 - x1) * (y2 - y1)``,
  ``inter = max(0, xx2 - xx1) * max(0, yy2 - yy1)``).
* The kept indices come back in score order.  With ``nms_cfg=None`` the
  function only sorts by score.

Everything here has static shapes: a box set of size N is described by a
validity mask instead of boolean indexing.  Functions work on one image;
batch with ``jax.vmap`` (``nms_keep`` and ``topk_after_nms`` also accept a
leading batch axis and vmap themselves).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ddq_jax import backend

_AUTO_OVERRIDE: list[str] = []


@contextlib.contextmanager
def auto_method(method: str) -> Iterator[None]:
  """While active, ``method='auto'`` means ``method`` (e.g. an exporter
  traces 'fixed_point' whatever this host's backend is)."""
  if method not in ('sequential', 'fixed_point'):
    raise ValueError(f"NMS method {method!r}: expected 'sequential' or "
                     "'fixed_point'")
  _AUTO_OVERRIDE.append(method)
  try:
    yield
  finally:
    _AUTO_OVERRIDE.pop()


def sort_by_score(scores: jnp.ndarray, *,
                  valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Indices that sort ``scores`` (N,) descending; ties keep the index order;
  invalid entries go last (in index order).  Returns (N,) int32."""
  n = scores.shape[0]
  iota = jnp.arange(n, dtype=jnp.int32)
  invalid = (jnp.zeros((n,), jnp.int32) if valid is None
             else (~valid).astype(jnp.int32))
  _, _, order = jax.lax.sort((invalid, -scores, iota), num_keys=2,
                             is_stable=True)
  return order


def batched_nms_offset_boxes(boxes: jnp.ndarray, *,
                             valid: Optional[jnp.ndarray] = None
                             ) -> jnp.ndarray:
  """``boxes + (boxes[valid].max() + 1)``: mmcv ``batched_nms``'s shift for a
  single cluster (idxs all ones).  boxes (N, 4) -> (N, 4)."""
  if valid is None:
    m = jnp.max(boxes)
  else:
    m = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf))
    m = jnp.where(jnp.any(valid), m, 0.0).astype(boxes.dtype)
  return boxes + (m + jnp.asarray(1, boxes.dtype))


def suppression_matrix(boxes: jnp.ndarray, *,
                       iou_threshold: float) -> jnp.ndarray:
  """sup[i, j] = IoU(box i, box j) > thr, with mmcv's CPU kernel arithmetic.

  boxes (N, 4) xyxy -> (N, N) bool.
  """
  x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
  areas = (x2 - x1) * (y2 - y1)
  xx1 = jnp.maximum(x1[:, None], x1[None, :])
  yy1 = jnp.maximum(y1[:, None], y1[None, :])
  xx2 = jnp.minimum(x2[:, None], x2[None, :])
  yy2 = jnp.minimum(y2[:, None], y2[None, :])
  w = jnp.maximum(jnp.zeros((), boxes.dtype), xx2 - xx1)
  h = jnp.maximum(jnp.zeros((), boxes.dtype), yy2 - yy1)
  inter = w * h
  ovr = inter / ((areas[:, None] + areas[None, :]) - inter)
  return ovr > jnp.asarray(iou_threshold, boxes.dtype)


def greedy_nms_sorted(sup: jnp.ndarray, valid: jnp.ndarray, *,
                      method: str = 'auto') -> jnp.ndarray:
  """Greedy NMS on boxes already in score order.

  Args:
    sup: (N, N) bool, ``sup[i, j]``: box i suppresses box j if i is kept and
      ranks higher (only the strict upper triangle is read).
    valid: (N,) bool, boxes that take part.
    method: 'sequential' (a fori_loop over the N boxes, O(N^2) work: best on
      CPU), 'fixed_point' (iterates keep[j] = valid[j] & no kept i < j
      suppresses j until it stops changing; the same result, each step is
      one dense (N, N) reduction: best on accelerators), or 'auto' (the one
      set by ``auto_method``, else by the default backend).
  Returns:
    keep (N,) bool in the same (sorted) order.
  """
  n = valid.shape[0]
  if n == 0:
    return valid
  if method == 'auto' and _AUTO_OVERRIDE:
    method = _AUTO_OVERRIDE[-1]
  if method == 'auto':
    method = 'sequential' if backend.is_cpu() else 'fixed_point'
  upper = jnp.triu(jnp.ones((n, n), bool), k=1)
  sup = sup & upper
  if method == 'sequential':
    def body(i, keep):
      row = jax.lax.dynamic_index_in_dim(sup, i, axis=0, keepdims=False)
      return keep & ~(row & keep[i])
    return jax.lax.fori_loop(0, n, body, valid)
  if method == 'fixed_point':
    # Entry j depends only on entries < j, so after t steps the first t
    # entries are final: at most n steps, usually a handful.
    def step(keep):
      return valid & ~jnp.any(keep[:, None] & sup, axis=0)

    def cond(state):
      keep, prev, it = state
      return jnp.any(keep != prev) & (it < n + 1)

    def body(state):
      keep, _, it = state
      return step(keep), keep, it + 1

    keep0 = valid
    keep, _, _ = jax.lax.while_loop(cond, body, (step(keep0), keep0, 0))
    return keep
  raise ValueError(f'unknown NMS method {method!r}')


def nms_keep(boxes: jnp.ndarray, scores: jnp.ndarray, *,
             valid: Optional[jnp.ndarray] = None,
             iou_threshold: float,
             batched_offset: bool = True,
             method: str = 'auto') -> jnp.ndarray:
  """Exact greedy NMS among the valid boxes, as mmcv ``batched_nms`` with
  ``idxs`` all ones and ``nms_cfg=dict(type='nms', iou_threshold=thr)``
  applied to ``boxes[valid]``.

  Args:
    boxes: (N, 4) or (B, N, 4) xyxy.
    scores: (N,) or (B, N).
    valid: (N,) / (B, N) bool, boxes that take part (default all).
    iou_threshold: a box is dropped when its IoU with a higher-ranked kept
      box is > this (strictly).
    batched_offset: shift the boxes by ``max(valid boxes) + 1`` first, as
      ``batched_nms`` does (changes float rounding, not geometry).
    method: see ``greedy_nms_sorted``.
  Returns:
    keep: (N,) / (B, N) bool in the input order; False for invalid boxes.
  """
  if boxes.ndim == 3:
    return jax.vmap(lambda b, s, v: nms_keep(
        b, s, valid=v, iou_threshold=iou_threshold,
        batched_offset=batched_offset, method=method))(
            boxes, scores,
            jnp.ones(scores.shape, bool) if valid is None else valid)
  n = scores.shape[0]
  if valid is None:
    valid = jnp.ones((n,), bool)
  if batched_offset:
    boxes = batched_nms_offset_boxes(boxes, valid=valid)
  order = sort_by_score(scores, valid=valid)
  sup = suppression_matrix(boxes[order], iou_threshold=iou_threshold)
  keep_sorted = greedy_nms_sorted(sup, valid[order], method=method)
  return unpermute(keep_sorted, order=order)


def unpermute(values: jnp.ndarray, *, order: jnp.ndarray) -> jnp.ndarray:
  """out[order[i]] = values[i] for a permutation ``order`` (N,) of bool
  ``values`` (N,), as a one-hot matrix (no scatter: exporters such as ONNX
  express it directly)."""
  n = order.shape[0]
  hit = order[:, None] == jnp.arange(n, dtype=order.dtype)[None, :]
  return jnp.any(hit & values[:, None], axis=0)


def first_kept(keep: jnp.ndarray, *, num_keep: int) -> jnp.ndarray:
  """Positions (num_keep,) int32 of the first ``num_keep`` True entries of
  ``keep`` (N,) in order, -1 for padding: a top-k over descending position
  keys (no scatter)."""
  n = keep.shape[0]
  key = jnp.where(keep, n - jnp.arange(n, dtype=jnp.int32), 0)
  if num_keep > n:
    key = jnp.concatenate([key, jnp.zeros((num_keep - n,), jnp.int32)])
  top, _ = jax.lax.top_k(key, num_keep)
  return jnp.where(top > 0, n - top, -1)


class TopKAfterNms(NamedTuple):
  """``topk_after_nms``'s result (with a leading batch axis when batched).

  indices: (num_keep,) int32 positions into the N boxes, survivors in score
    order, -1 for padding.
  num_kept: () int32, survivors among the pre_topk candidates (not clipped
    to num_keep).
  cut: () bool, True when the static candidate bound may have dropped a
    survivor: fewer than num_keep survived among the candidates while valid
    boxes ranked below them were left out.  False guarantees the result
    equals the NMS over all valid boxes.
  """
  indices: jnp.ndarray
  num_kept: jnp.ndarray
  cut: jnp.ndarray


def topk_after_nms(boxes: jnp.ndarray, scores: jnp.ndarray, *,
                   iou_threshold: Optional[float],
                   pre_topk: int,
                   num_keep: int,
                   valid: Optional[jnp.ndarray] = None,
                   batched_offset: bool = True,
                   method: str = 'auto') -> TopKAfterNms:
  """The first ``num_keep`` survivors of ``batched_nms``, in score order.

  The top ``pre_topk`` valid boxes by score (static; ties in index order)
  go through the exact greedy NMS; the result equals the NMS over all
  valid boxes whenever the reference's ``num_keep``-th survivor ranks
  within ``pre_topk`` (always when pre_topk >= the number of valid boxes),
  and ``cut`` says when that is not certain.  The ``batched_nms`` shift
  uses the max over all N (valid) boxes, as the reference does.

  Args:
    boxes: (N, 4) or (B, N, 4) xyxy.
    scores: (N,) or (B, N).
    iou_threshold: NMS threshold, or None for "only sort by score"
      (``batched_nms`` with ``nms_cfg=None``).
    pre_topk: static number of candidates (clipped to N).
    num_keep: static number of output slots.
    valid: optional (N,) / (B, N) bool; invalid boxes never survive.
  Returns:
    ``TopKAfterNms`` (indices, num_kept, cut).
  """
  if boxes.ndim == 3:
    return jax.vmap(lambda b, s, v: topk_after_nms(
        b, s, iou_threshold=iou_threshold, pre_topk=pre_topk,
        num_keep=num_keep, valid=v, batched_offset=batched_offset,
        method=method))(
            boxes, scores,
            jnp.ones(scores.shape, bool) if valid is None else valid)
  n = scores.shape[0]
  if valid is None:
    valid = jnp.ones((n,), bool)
  k = min(int(pre_topk), n) if iou_threshold is not None else n
  order = sort_by_score(scores, valid=valid)[:k]
  valid_k = valid[order]
  if iou_threshold is None:
    keep = valid_k
  else:
    if batched_offset:
      boxes = batched_nms_offset_boxes(boxes, valid=valid)
    sup = suppression_matrix(boxes[order], iou_threshold=iou_threshold)
    keep = greedy_nms_sorted(sup, valid_k, method=method)
  pos = first_kept(keep, num_keep=num_keep)
  indices = jnp.where(pos >= 0, order[jnp.maximum(pos, 0)], -1)
  num_kept = jnp.sum(keep.astype(jnp.int32))
  left_out = jnp.sum(valid.astype(jnp.int32)) - jnp.sum(
      valid_k.astype(jnp.int32))
  cut = (num_kept < num_keep) & (left_out > 0)
  return TopKAfterNms(indices, num_kept, cut)
