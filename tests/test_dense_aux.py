"""Dense auxiliary loss (DDQAuxLoss + TopkHungarianAssigner): parity per
layer, the 1-to-k rule, the per-gt normalisation, detached targets."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ddq_jax.losses import dense_aux as A
from ddq_jax.ops import boxes as box_ops

ND = 45
KEYS = ['0_aux', '1_aux', '2_aux']


def _gt(i):
  return dict(gt_boxes=jnp.asarray(i['gt_boxes']),
              gt_labels=jnp.asarray(i['gt_labels'], jnp.int32),
              gt_valid=jnp.asarray(i['gt_valid']),
              img_shapes=jnp.asarray(i['img_shapes'], jnp.int32))


def _dense(t):
  cls = np.concatenate([t['all_layers_cls_scores'][:, :, -ND:],
                        t['head_in_aux_enc_outputs_class'][None]], 0)
  box = np.concatenate([t['all_layers_bbox_preds'][:, :, -ND:],
                        t['head_in_aux_enc_outputs_coord'][None]], 0)
  return jnp.asarray(cls), jnp.asarray(box)


@pytest.fixture(scope='module')
def aux_out(tiny_train, tiny_inputs):
  cls, box = _dense(tiny_train)
  fn = jax.jit(lambda c, b, g: A.dense_aux_loss(c, b, **g))
  return fn(cls, box, _gt(tiny_inputs))


def test_dense_aux_matches_reference(tiny_train, aux_out):
  names = KEYS + ['aux_enc']
  for j, name in enumerate(names):
    for part, val in (('cls', aux_out[0][j]), ('bbox', aux_out[1][j])):
      ref = float(tiny_train[f'loss/{name}_aux_loss_{part}'])
      assert abs(float(val) - ref) <= 1e-4 * abs(ref), (name, part, val, ref)


def _assign(probs, boxes_px, g, topk=4):
  return A.topk_hungarian_assign(probs, boxes_px, topk=topk, **g)


def _random_case(seed, n, num_gt, g_slots=8, b=2):
  rng = np.random.default_rng(seed)
  probs = jnp.asarray(rng.uniform(0.01, 0.99, (b, n, 5)), jnp.float32)
  ctr = rng.uniform(20, 80, (b, n, 2))
  wh = rng.uniform(5, 40, (b, n, 2))
  boxes = jnp.asarray(np.concatenate([ctr - wh / 2, ctr + wh / 2], -1),
                      jnp.float32)
  gctr = rng.uniform(20, 80, (b, g_slots, 2))
  gwh = rng.uniform(5, 40, (b, g_slots, 2))
  gtb = np.concatenate([gctr - gwh / 2, gctr + gwh / 2], -1)
  valid = np.zeros((b, g_slots), bool)
  for i, k in enumerate(num_gt):
    valid[i, rng.choice(g_slots, k, replace=False)] = True
  g = dict(gt_boxes=jnp.asarray(gtb, jnp.float32),
           gt_labels=jnp.asarray(rng.integers(0, 5, (b, g_slots)), jnp.int32),
           gt_valid=jnp.asarray(valid),
           img_shapes=jnp.asarray([[100, 100]] * b, jnp.int32))
  return probs, boxes, g


@pytest.mark.parametrize('n,num_gt', [(20, (3, 0)), (20, (8, 6)), (5, (7, 1)),
                                      (12, (4, 5))])
def test_topk_rule_and_normalisation(n, num_gt):
  """k = min(4, N // num_gt) positives per gt (0 if num_gt > N); the
  metric score^1 * IoU^6 normalised per gt (m / (max m + 1e-7) * max IoU);
  padded gt slots get nothing."""
  probs, boxes, g = _random_case(n * 7 + sum(num_gt), n, num_gt)
  assigned, norm = jax.jit(_assign)(probs, boxes, g)
  assigned, norm = np.asarray(assigned), np.asarray(norm)
  iou = np.asarray(box_ops.pairwise_iou(boxes, g['gt_boxes']))
  valid = np.asarray(g['gt_valid'])
  for b, ngt in enumerate(num_gt):
    k = min(4, n // ngt) if ngt else 0
    for gi in range(valid.shape[1]):
      rows = np.nonzero(assigned[b] == gi)[0]
      if not valid[b, gi]:
        assert rows.size == 0
        continue
      assert rows.size == k, (b, gi, rows, k)
      if k:
        lab = int(g['gt_labels'][b, gi])
        m = np.asarray(probs)[b, rows, lab] * iou[b, rows, gi]**6
        exp = m / (m.max() + 1e-7) * iou[b, rows, gi].max()
        np.testing.assert_allclose(norm[b, rows], exp, rtol=1e-4, atol=1e-9)
    assert np.all(norm[b][assigned[b] < 0] == 0)


def test_image_without_gt_contributes_nothing():
  probs, boxes, g = _random_case(3, 20, (3, 0))
  logits = jnp.log(probs / (1 - probs))
  cxcywh = box_ops.xyxy_to_cxcywh(boxes) / 100.0
  both = A.dense_aux_loss(logits, cxcywh, **g)
  g1 = {k: v[:1] for k, v in g.items()}
  first = A.dense_aux_loss(logits[:1], cxcywh[:1], **g1)
  np.testing.assert_allclose(np.array(both), np.array(first), rtol=1e-6)
  g_none = dict(g, gt_valid=jnp.zeros_like(g['gt_valid']))
  none = A.dense_aux_loss(logits, cxcywh, **g_none)
  assert np.all(np.array(none) == 0)
  gr = jax.grad(lambda l, c: sum(A.dense_aux_loss(l, c, **g_none)),
                (0, 1))(logits, cxcywh)
  assert all(np.all(np.isfinite(x)) for x in gr)


def test_targets_are_detached(tiny_train, tiny_inputs):
  """The gradient equals that of the same loss with the assignment and the
  normalised alignment metrics frozen as constants (reference: assigner
  inputs and metrics are .detach()-ed)."""
  cls, box = _dense(tiny_train)
  cls, box = cls[0], box[0]
  g = _gt(tiny_inputs)
  probs = jax.nn.sigmoid(cls)
  h = g['img_shapes'][:, 0].astype(jnp.float32)
  w = g['img_shapes'][:, 1].astype(jnp.float32)
  factor = jnp.stack([w, h, w, h], -1)[:, None, :]
  px = box_ops.cxcywh_to_xyxy(box) * factor
  assigned, norm = A.topk_hungarian_assign(probs, px, **g)

  def frozen(c, b):
    frozen_fn = lambda *a, **k: (assigned, norm)
    return sum(_with_assign(frozen_fn, c, b, g))

  def live(c, b):
    return sum(A.dense_aux_loss(c, b, **g))

  g_live = jax.grad(live, (0, 1))(cls, box)
  g_frozen = jax.grad(frozen, (0, 1))(cls, box)
  for a, b in zip(g_live, g_frozen):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-8)
  assert float(jnp.abs(g_live[0]).sum()) > 0


def _with_assign(assign_fn, c, b, g):
  orig = A.topk_hungarian_assign
  A.topk_hungarian_assign = assign_fn
  try:
    return A.dense_aux_loss(c, b, **g)
  finally:
    A.topk_hungarian_assign = orig
