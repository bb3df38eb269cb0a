"""Exactness of the static-shape NMS against a plain sequential NumPy port of
mmcv's CPU kernel (float32, stable descending sort, IoU > thr strictly)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax.ops import nms as nms_ops


def ref_batched_nms(boxes, scores, thr, offset=True):
  """mmcv batched_nms(boxes, scores, ones, dict(iou_threshold=thr)) ->
  kept indices in score order.  thr=None: sort only."""
  boxes = np.asarray(boxes, np.float32)
  scores = np.asarray(scores, np.float32)
  order = np.argsort(-scores, kind='stable')
  if thr is None or len(scores) == 0:
    return order
  if offset:
    boxes = boxes + (boxes.max() + np.float32(1))
  x1, y1, x2, y2 = boxes.T
  areas = (x2 - x1) * (y2 - y1)
  select = np.ones(len(order), bool)
  thr = np.float32(thr)
  for a in range(len(order)):
    if not select[a]:
      continue
    i = order[a]
    for b in range(a + 1, len(order)):
      if not select[b]:
        continue
      j = order[b]
      w = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]))
      h = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]))
      inter = np.float32(w * h)
      with np.errstate(invalid='ignore', divide='ignore'):  # 0/0: NaN, kept
        ovr = np.float32(inter / np.float32(np.float32(areas[i] + areas[j])
                                            - inter))
      if ovr > thr:
        select[b] = False
  return order[select]


def random_boxes(rng, n, *, quantise=False):
  cxcy = rng.uniform(0, 1, (n, 2))
  wh = rng.uniform(0.02, 0.4, (n, 2))
  # clusters of near-duplicates so that the NMS has work to do
  dup = rng.integers(0, n, n // 2)
  cxcy[: n // 2] = cxcy[dup] + rng.normal(0, 0.01, (n // 2, 2))
  wh[: n // 2] = wh[dup] * rng.uniform(0.9, 1.1, (n // 2, 2))
  boxes = np.concatenate([cxcy - wh / 2, cxcy + wh / 2], -1).astype(np.float32)
  scores = rng.uniform(0, 1, n).astype(np.float32)
  if quantise:  # many exact score ties
    scores = np.round(scores * 8) / 8
    boxes = np.round(boxes * 16) / 16
  return boxes, scores.astype(np.float32)


@pytest.mark.parametrize('method', ['sequential', 'fixed_point'])
@pytest.mark.parametrize('quantise', [False, True])
@pytest.mark.parametrize('thr', [0.5, 0.8])
def test_nms_keep_matches_reference(method, quantise, thr):
  rng = np.random.default_rng(int(thr * 10) + 2 * quantise)
  fn = jax.jit(lambda b, s, v: nms_ops.nms_keep(
      b, s, valid=v, iou_threshold=thr, method=method))
  for trial in range(6):
    n = 60
    boxes, scores = random_boxes(rng, n, quantise=quantise)
    valid = rng.uniform(size=n) < (1.0 if trial % 2 == 0 else 0.7)
    keep = np.asarray(fn(boxes, scores, valid))
    sub = np.nonzero(valid)[0]
    ref = sub[ref_batched_nms(boxes[sub], scores[sub], thr)]
    expected = np.zeros(n, bool)
    expected[ref] = True
    np.testing.assert_array_equal(keep, expected)
    assert keep.sum() < valid.sum() or quantise is False


def test_nms_keep_batched_vmap():
  rng = np.random.default_rng(7)
  bs = [random_boxes(rng, 40, quantise=True) for _ in range(3)]
  boxes = np.stack([b for b, _ in bs])
  scores = np.stack([s for _, s in bs])
  keep = np.asarray(jax.jit(lambda b, s: nms_ops.nms_keep(
      b, s, iou_threshold=0.6))(boxes, scores))
  for i in range(3):
    expected = np.zeros(40, bool)
    expected[ref_batched_nms(boxes[i], scores[i], 0.6)] = True
    np.testing.assert_array_equal(keep[i], expected)


@pytest.mark.parametrize('quantise', [False, True])
def test_topk_after_nms_exact(quantise):
  rng = np.random.default_rng(3 + quantise)
  n, num_keep = 120, 25
  for trial in range(5):
    boxes, scores = random_boxes(rng, n, quantise=quantise)
    ref = ref_batched_nms(boxes, scores, 0.7)
    # full candidate set: always exact
    idx, num_kept, cut = jax.jit(lambda b, s: nms_ops.topk_after_nms(
        b, s, iou_threshold=0.7, pre_topk=1000, num_keep=num_keep))(
            boxes, scores)
    assert not bool(cut)
    expected = np.full(num_keep, -1)
    expected[:min(num_keep, len(ref))] = ref[:num_keep]
    np.testing.assert_array_equal(np.asarray(idx), expected)
    assert int(num_kept) == len(ref)
    # a pre-selection: exact whenever the last kept box ranks within it
    rank = np.empty(n, int)
    rank[np.argsort(-scores, kind='stable')] = np.arange(n)
    last_rank = rank[ref[min(num_keep, len(ref)) - 1]]
    for pre in (last_rank + 1, last_rank + 7, n // 2, 5, last_rank):
      idx, _, cut = nms_ops.topk_after_nms(
          boxes, scores, iou_threshold=0.7, pre_topk=int(pre),
          num_keep=num_keep)
      if pre > last_rank:
        np.testing.assert_array_equal(np.asarray(idx), expected)
      # Nothing is cut silently: a result that differs is flagged.
      if not np.array_equal(np.asarray(idx), expected):
        assert bool(cut), (pre, last_rank)


def test_topk_after_nms_pads_and_sorts_only():
  rng = np.random.default_rng(11)
  boxes, scores = random_boxes(rng, 30, quantise=True)
  # everything identical: one survivor, the rest padding
  same = np.tile(np.float32([[0.1, 0.2, 0.5, 0.7]]), (30, 1))
  idx, num_kept, cut = nms_ops.topk_after_nms(
      same, scores, iou_threshold=0.8, pre_topk=30, num_keep=10)
  assert not bool(cut)
  ref = ref_batched_nms(same, scores, 0.8)
  assert int(num_kept) == len(ref) == 1
  np.testing.assert_array_equal(np.asarray(idx), [ref[0]] + [-1] * 9)
  # iou_threshold=None: only sorting (stable on ties)
  idx, num_kept, _ = nms_ops.topk_after_nms(
      boxes, scores, iou_threshold=None, pre_topk=5, num_keep=12)
  np.testing.assert_array_equal(np.asarray(idx),
                                np.argsort(-scores, kind='stable')[:12])
  assert int(num_kept) == 30
  # batched with validity
  valid = np.ones((2, 30), bool)
  valid[1, ::2] = False
  idx, num_kept, _ = nms_ops.topk_after_nms(
      np.stack([boxes, boxes]), np.stack([scores, scores]),
      iou_threshold=0.5, pre_topk=30, num_keep=30, valid=valid)
  sub = np.nonzero(valid[1])[0]
  ref = sub[ref_batched_nms(boxes[sub], scores[sub], 0.5)]
  np.testing.assert_array_equal(np.asarray(idx[1])[:len(ref)], ref)
  assert int(num_kept[1]) == len(ref)
  assert (np.asarray(idx[1])[len(ref):] == -1).all()


def test_offset_changes_rounding_only():
  """The batched_nms shift is part of the arithmetic: both paths agree
  with their own NumPy reference."""
  rng = np.random.default_rng(5)
  boxes, scores = random_boxes(rng, 80)
  for offset in (True, False):
    keep = np.asarray(nms_ops.nms_keep(boxes, scores, iou_threshold=0.8,
                                       batched_offset=offset))
    expected = np.zeros(80, bool)
    expected[ref_batched_nms(boxes, scores, 0.8, offset=offset)] = True
    np.testing.assert_array_equal(keep, expected)
