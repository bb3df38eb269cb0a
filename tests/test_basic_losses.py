"""Elementary losses and match costs vs numpy transcriptions of mmdet 3.3.0,
and two real loss terms of the tiny fixture (encoder one-to-one loss and the
dense auxiliary QFL/GIoU loss), both through hungarian_match."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from conftest import assert_close
from ddq_jax.losses import basic
from ddq_jax.losses import match_costs
from ddq_jax.losses.hungarian import hungarian_match
from ddq_jax.ops.boxes import cxcywh_to_xyxy
from ddq_jax.ops.boxes import xyxy_to_cxcywh

# --------------------------------------------------------------------------
# numpy transcriptions of the reference formulas (float64)
# --------------------------------------------------------------------------


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_bce_logits(x, t):
  return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def np_bce_prob(p, t):
  with np.errstate(divide='ignore'):
    return -(t * np.maximum(np.log(p), -100) +
             (1 - t) * np.maximum(np.log(1 - p), -100))


def np_focal(x, t, w, alpha=0.25, gamma=2.0):
  p = np_sigmoid(x)
  pt = (1 - p) * t + p * (1 - t)
  fw = (alpha * t + (1 - alpha) * (1 - t)) * pt**gamma
  return np_bce_logits(x, t) * fw * w[:, None]


def np_qfl(pred, labels, scores, beta=2.0, activated=False):
  sig = pred if activated else np_sigmoid(pred)
  bce = np_bce_prob if activated else np_bce_logits
  loss = bce(pred, np.zeros_like(pred)) * sig**beta
  for n in range(pred.shape[0]):
    c = labels[n]
    if 0 <= c < pred.shape[1]:
      sf = scores[n] - sig[n, c]
      loss[n, c] = bce(pred[n, c], scores[n]) * abs(sf)**beta
  return loss.sum(1)


def np_giou_pairs(a, b, eps=1e-6, aligned=False):
  if not aligned:
    a, b = a[:, None], b[None]
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  lt = np.maximum(a[..., :2], b[..., :2])
  rb = np.minimum(a[..., 2:], b[..., 2:])
  wh = np.clip(rb - lt, 0, None)
  ov = wh[..., 0] * wh[..., 1]
  union = np.maximum(area_a + area_b - ov, eps)
  elt = np.minimum(a[..., :2], b[..., :2])
  erb = np.maximum(a[..., 2:], b[..., 2:])
  ewh = np.clip(erb - elt, 0, None)
  earea = np.maximum(ewh[..., 0] * ewh[..., 1], eps)
  return ov / union - (earea - union) / earea, ov / union


def np_focal_cost(x, labels, w=2.0, alpha=0.25, gamma=2.0, eps=1e-12):
  p = np_sigmoid(x)
  neg = -np.log(1 - p + eps) * (1 - alpha) * p**gamma
  pos = -np.log(p + eps) * alpha * (1 - p)**gamma
  return (pos[:, labels] - neg[:, labels]) * w


def _rand_boxes(rng, n, scale=100.0):
  xy = rng.random((n, 2)) * scale
  wh = rng.random((n, 2)) * scale * 0.5 + 1
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


# --------------------------------------------------------------------------
# elementary losses
# --------------------------------------------------------------------------


def test_sigmoid_focal_loss():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(40, 7)) * 4).astype(np.float32)
  labels = rng.integers(0, 8, 40)  # 7 = background
  t = np.eye(8)[labels][:, :7]
  w = (rng.random(40) > 0.2).astype(np.float32)
  got = basic.sigmoid_focal_loss(
      x, basic.labels_to_onehot(jnp.asarray(labels), 7), weight=w)
  assert_close(got, np_focal(x.astype(np.float64), t, w), rel=1e-5)
  g = jax.grad(lambda z: basic.sigmoid_focal_loss(z, t, weight=w).sum())(x)
  assert np.isfinite(np.asarray(g)).all()


def test_l1_and_giou_loss():
  rng = np.random.default_rng(1)
  a, b = _rand_boxes(rng, 30), _rand_boxes(rng, 30)
  w4 = np.repeat((rng.random(30) > 0.3).astype(np.float32)[:, None], 4, 1)
  assert_close(basic.l1_loss(a, b, weight=w4), np.abs(a - b) * w4, rel=1e-6)
  ref = (1 - np_giou_pairs(a.astype(np.float64), b, aligned=True)[0]) * w4[:, 0]
  assert_close(basic.giou_loss(a, b, weight=w4), ref, rel=1e-5)
  assert_close(basic.giou_loss(a, b, weight=w4[:, 0]), ref, rel=1e-5)


@pytest.mark.parametrize('activated', [False, True])
def test_quality_focal_loss(activated):
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(50, 6)) * 3).astype(np.float32)
  pred = np_sigmoid(x).astype(np.float32) if activated else x
  if activated:
    pred[0, 0], pred[1, 1] = 0.0, 1.0  # torch's -100 log clamp
  labels = rng.integers(-1, 7, 50)  # -1 and 6 are negatives
  labels[0], labels[1] = 0, 2
  scores = rng.random(50).astype(np.float32)
  w = rng.random(50).astype(np.float32)
  got = basic.quality_focal_loss(pred, jnp.asarray(labels), scores, weight=w,
                                 activated=activated)
  ref = np_qfl(pred.astype(np.float64), labels, scores.astype(np.float64),
               activated=activated) * w
  assert_close(got, ref, rel=1e-5)
  g = jax.grad(lambda p: basic.quality_focal_loss(
      p, jnp.asarray(labels), scores, activated=activated).sum())(pred)
  assert np.isfinite(np.asarray(g)).all()


def test_bce_prob_grad_matches_torch_formula():
  p = jnp.array([0.2, 0.7, 0.5], jnp.float32)
  t = jnp.array([0.0, 0.3, 1.0], jnp.float32)
  g = jax.grad(lambda q: basic.binary_cross_entropy(q, t).sum())(p)
  assert_close(g, (p - t) / (p * (1 - p)), rel=1e-6)


def test_avg_factor_and_reduce():
  assert float(basic.avg_factor(0)) == 1.0
  assert float(basic.avg_factor(7.0)) == 7.0
  assert float(basic.reduce_with_avg_factor(14.0, 7.0)) == pytest.approx(
      14.0 / (7.0 + np.finfo(np.float32).eps))
  # pmean across a named axis (mmdet reduce_mean)
  out = jax.vmap(lambda v: basic.avg_factor(v, axis_name='d'),
                 axis_name='d')(jnp.array([0.0, 1.0, 5.0]))
  np.testing.assert_allclose(np.asarray(out), [2.0, 2.0, 2.0])


# --------------------------------------------------------------------------
# match costs
# --------------------------------------------------------------------------


def test_match_costs():
  rng = np.random.default_rng(3)
  q, g, k = 25, 6, 9
  hw = np.array([96, 128])
  f = np.array([128, 96, 128, 96], np.float64)
  logits = (rng.normal(size=(q, k)) * 3).astype(np.float32)
  pred = np.concatenate([rng.random((q, 2)), rng.random((q, 2)) * 0.5],
                        -1).astype(np.float32)
  gt_xyxy = _rand_boxes(rng, g, 90.0)
  labels = rng.integers(0, k, g)
  pred_xyxy = np.asarray(cxcywh_to_xyxy(pred), np.float64) * f
  gxy = gt_xyxy.astype(np.float64)
  # float32 like the reference: log(1 - p + 1e-12) is ill-conditioned for
  # confident logits (1 - p has few bits), so transcribe in float32
  ref_cls = np_focal_cost(logits, labels).astype(np.float64)
  pc = np.asarray(xyxy_to_cxcywh(pred_xyxy)) / f
  gc = np.asarray(xyxy_to_cxcywh(gxy)) / f
  ref_l1 = np.abs(pc[:, None] - gc[None]).sum(-1) * 5.0
  ref_iou = -np_giou_pairs(pred_xyxy, gxy)[0] * 2.0
  assert_close(match_costs.focal_loss_cost(logits, jnp.asarray(labels)),
               ref_cls, rel=1e-4)
  assert_close(match_costs.iou_cost(pred_xyxy.astype(np.float32), gt_xyxy),
               ref_iou, rel=1e-5)
  total = match_costs.hungarian_cost(
      cls_logits=logits, boxes_cxcywh_norm=pred, gt_labels=jnp.asarray(labels),
      gt_boxes_xyxy=gt_xyxy, img_hw=hw)
  assert_close(total, ref_cls + ref_l1 + ref_iou, rel=1e-4)
  gt_norm = xyxy_to_cxcywh(gt_xyxy / f.astype(np.float32))
  total2 = match_costs.hungarian_cost(
      cls_logits=logits, boxes_cxcywh_norm=pred, gt_labels=jnp.asarray(labels),
      gt_boxes_cxcywh_norm=gt_norm, img_hw=hw)
  assert_close(total2, total, rel=1e-5)


# --------------------------------------------------------------------------
# real loss terms of the tiny fixture
# --------------------------------------------------------------------------


def _gt(tiny_inputs, b):
  return (tiny_inputs['gt_boxes'][b], tiny_inputs['gt_labels'][b],
          tiny_inputs['gt_valid'][b], tiny_inputs['img_shapes'][b])


def _enc_loss_sums(cls, box, gtb, gtl, gtv, hw, *, solver):
  """One image of DETRHead.loss_by_feat_single: (cls, l1, giou) sums, #pos."""
  nq, k = cls.shape
  cost = match_costs.hungarian_cost(
      cls_logits=cls, boxes_cxcywh_norm=box, gt_labels=gtl,
      gt_boxes_xyxy=gtb, img_hw=hw)
  m = hungarian_match(cost, col_valid=gtv, solver=solver)
  pos = m >= 0
  idx = jnp.maximum(m, 0)
  labels = jnp.where(pos, gtl[idx], k)
  l_cls = basic.sigmoid_focal_loss(
      cls, basic.labels_to_onehot(labels, k), weight=jnp.ones(nq)).sum()
  f = jnp.stack([hw[1], hw[0], hw[1], hw[0]]).astype(jnp.float32)
  tgt = xyxy_to_cxcywh(gtb[idx] / f)
  w = jnp.repeat(pos.astype(jnp.float32)[:, None], 4, 1)
  l_l1 = basic.l1_loss(box, tgt, weight=w).sum()
  l_iou = basic.giou_loss(cxcywh_to_xyxy(box) * f, cxcywh_to_xyxy(tgt) * f,
                          weight=w).sum()
  return l_cls, l_l1, l_iou, pos.sum()


@pytest.mark.parametrize('solver', ['scipy', 'jax'])
def test_fixture_encoder_loss(tiny_train, tiny_inputs, solver):
  """enc_loss_{cls,bbox,iou}: DETRHead.loss_by_feat_single on the encoder's
  top-k (no distinct-query masking), 2 images, padded gt; jit + vmap."""
  @jax.jit
  def losses(cls, box, gtb, gtl, gtv, hw):
    l_cls, l_l1, l_iou, npos = jax.vmap(
        lambda *a: _enc_loss_sums(*a, solver=solver))(
            cls, box, gtb, gtl, gtv, hw)
    af = basic.avg_factor(npos.sum())
    return (basic.reduce_with_avg_factor(l_cls.sum(), af),
            5.0 * basic.reduce_with_avg_factor(l_l1.sum(), af),
            2.0 * basic.reduce_with_avg_factor(l_iou.sum(), af))

  l_cls, l_l1, l_iou = losses(
      tiny_train['head_in_enc_outputs_class'],
      tiny_train['head_in_enc_outputs_coord'], tiny_inputs['gt_boxes'],
      tiny_inputs['gt_labels'], tiny_inputs['gt_valid'],
      tiny_inputs['img_shapes'])
  assert_close(l_cls, tiny_train['loss/enc_loss_cls'][0], rel=1e-5)
  assert_close(l_l1, tiny_train['loss/enc_loss_bbox'], rel=1e-5)
  assert_close(l_iou, tiny_train['loss/enc_loss_iou'], rel=1e-5)


_JAX_MATCH = jax.jit(lambda c, r, v: hungarian_match(
    c, row_valid=r, col_valid=v, solver='jax'))


def test_fixture_dense_aux_loss(tiny_train, tiny_inputs):
  """aux_enc_aux_loss_{cls,bbox}: DDQAuxLoss on the dense encoder queries
  (TopkHungarianAssigner, QFL on probabilities, GIoU weighted by the
  normalised alignment metrics). Targets built here with numpy, the cost
  and the losses with this package."""
  probs_all = np_sigmoid(
      tiny_train['head_in_aux_enc_outputs_class'].astype(np.float64)
  ).astype(np.float32)
  coords = tiny_train['head_in_aux_enc_outputs_coord']
  cls_sums, box_sums, align_sum, pos_w_sum = [], [], 0.0, 0.0
  for b in range(2):
    gtb, gtl, gtv, hw = _gt(tiny_inputs, b)
    ng = int(gtv.sum())
    gtb, gtl = gtb[:ng], gtl[:ng]
    probs = probs_all[b]
    n, k = probs.shape
    f = np.array([hw[1], hw[0], hw[1], hw[0]], np.float32)
    boxes = np.asarray(cxcywh_to_xyxy(coords[b])) * f
    giou, iou = np_giou_pairs(boxes.astype(np.float64), gtb.astype(np.float64))
    align = probs[:, gtl].astype(np.float64) * iou**6
    cost = (np.asarray(match_costs.focal_loss_cost(probs, jnp.asarray(gtl)))
            + np.asarray(match_costs.bbox_l1_cost_pixels(
                boxes, gtb, img_hw=hw, box_format='xyxy'))
            + np.asarray(match_costs.iou_cost(boxes, gtb)))
    topk = min(4, n // ng)
    rep = np.repeat(cost, topk, axis=1)
    padded = np.zeros((n, 24), np.float32)
    padded[:, :rep.shape[1]] = rep
    m = np.asarray(_JAX_MATCH(padded, np.ones(n, bool),
                              np.arange(24) < rep.shape[1]))
    rows, cols = np.nonzero(m >= 0)[0], m[m >= 0]
    r2, c2 = linear_sum_assignment(rep.astype(np.float64))
    np.testing.assert_array_equal(rows, r2)
    np.testing.assert_array_equal(cols // topk, c2 // topk)
    gt_of = cols // topk
    labels = np.full(n, k)
    labels[rows] = gtl[gt_of]
    norm = np.zeros(n)
    pos_iou = iou[rows, gt_of]
    pos_align = align[rows, gt_of]
    for gi in np.unique(gt_of):
      sel = gt_of == gi
      norm[rows[sel]] = pos_align[sel] / (pos_align[sel].max() + 1e-7) * \
          pos_iou[sel].max()
    norm = norm.astype(np.float32)
    l_cls = basic.quality_focal_loss(probs, jnp.asarray(labels), norm,
                                     weight=jnp.ones(n), activated=True)
    cls_sums.append(basic.reduce_with_avg_factor(l_cls.sum(), 1.0))
    tgt = np.zeros((n, 4), np.float32)
    tgt[rows] = gtb[gt_of]
    w = np.zeros(n, np.float32)
    w[rows] = norm[rows]
    l_box = basic.giou_loss(boxes, tgt, weight=w)
    box_sums.append(2.0 * basic.reduce_with_avg_factor(l_box.sum(), 1.0))
    align_sum += norm.sum()
    pos_w_sum += norm[rows].sum()
  cls_af = basic.avg_factor(align_sum)
  box_af = basic.avg_factor(pos_w_sum)
  assert_close(sum(c / cls_af for c in cls_sums),
               tiny_train['loss/aux_enc_aux_loss_cls'], rel=1e-4)
  assert_close(sum(c / box_af for c in box_sums),
               tiny_train['loss/aux_enc_aux_loss_bbox'], rel=1e-4)
