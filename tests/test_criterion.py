"""DDQ-DETR criterion: parity with the reference's loss dict and gradients,
padding invariance, masked == indexed, edge cases, one compile."""
import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ddq_jax.config import load_config
from ddq_jax.losses import criterion as C
from ddq_jax.losses import set_loss as S
from ddq_jax.losses.config import CriterionConfig
from ddq_jax.losses.hungarian import hungarian_match_batched
from ddq_jax.model import outputs as O
from ddq_jax.model.denoising import dn_layout

NUM_DENSE = 45
NUM_DN_QUERIES = 20
CFG = CriterionConfig.from_config(load_config('tiny', {
    'loss.hungarian_solver': 'scipy'}))
REL = 1e-4
GT_KEYS = ('gt_boxes', 'gt_labels', 'gt_valid', 'img_shapes')


def _criterion(c, b, a, *, cfg=CFG, axis_name=None):
  """The production criterion on fixture arrays: the head outputs as the
  detector hands them over (``DetectorOutputs``), the denoising layout from
  the production ``dn_layout``."""
  qd = a['enc_cls_scores'].shape[-2]
  d = c.shape[2] - qd - NUM_DENSE
  outputs = O.DetectorOutputs(
      cls_logits=c, boxes=b, distinct_masks=a['distinct_masks'],
      layout=O.QueryLayout(num_dn=d, num_distinct=qd, num_dense=NUM_DENSE),
      encoder=O.EncoderPredictions(
          cls_logits=a['enc_cls_scores'], boxes=a['enc_bbox_preds'],
          dense_cls_logits=a['aux_enc_cls_scores'],
          dense_boxes=a['aux_enc_bbox_preds']),
      denoising=O.DenoisingTargets.from_layout(dn_layout(
          jnp.asarray(a['gt_valid']), num_dn_queries=NUM_DN_QUERIES,
          num_slots=d)))
  return C.ddq_criterion(outputs, cfg=cfg, axis_name=axis_name,
                         **{k: a[k] for k in GT_KEYS})


def _args(t, i):
  return dict(
      all_layers_cls_scores=t['all_layers_cls_scores'],
      all_layers_bbox_preds=t['all_layers_bbox_preds'],
      distinct_masks=np.stack([t['head_query_mask_0'], t['head_query_mask_1']]),
      enc_cls_scores=t['head_in_enc_outputs_class'],
      enc_bbox_preds=t['head_in_enc_outputs_coord'],
      aux_enc_cls_scores=t['head_in_aux_enc_outputs_class'],
      aux_enc_bbox_preds=t['head_in_aux_enc_outputs_coord'],
      gt_boxes=i['gt_boxes'], gt_labels=i['gt_labels'],
      gt_valid=i['gt_valid'], img_shapes=i['img_shapes'])


def _split(args):
  a = {k: np.asarray(v) for k, v in args.items()}
  a['gt_labels'] = a['gt_labels'].astype(np.int32)
  a['img_shapes'] = a['img_shapes'].astype(np.int32)
  return a.pop('all_layers_cls_scores'), a.pop('all_layers_bbox_preds'), a


_TRACES = []


def _losses_and_grads(c, b, a):
  _TRACES.append(c.shape)
  def total(c, b):
    losses = _criterion(c, b, a)
    return C.total_loss(losses), losses
  (_, losses), grads = jax.value_and_grad(total, (0, 1), has_aux=True)(c, b)
  return losses, grads


# One jitted function for every test with the fixture's shapes: one compile.
_JIT = jax.jit(_losses_and_grads)


def _run(args):
  losses, _ = _JIT(*_split(args))
  return {k: float(v) for k, v in losses.items()}


def _grads(args):
  return _JIT(*_split(args))[1]


def _rel(a, b):
  return abs(a - b) / max(abs(b), 1e-6)


@pytest.fixture(scope='module')
def fixture_losses(tiny_train, tiny_inputs):
  return _run(_args(tiny_train, tiny_inputs))


def test_every_loss_key_matches_reference(tiny_train, fixture_losses):
  ref = {k[5:]: float(np.ravel(v)[0]) for k, v in tiny_train.items()
         if k.startswith('loss/')}
  assert sorted(ref) == sorted(fixture_losses)
  errs = {k: _rel(fixture_losses[k], ref[k]) for k in ref}
  bad = {k: e for k, e in errs.items() if e > REL}
  assert not bad, bad
  total = sum(v for v in fixture_losses.values())
  assert _rel(total, float(np.ravel(tiny_train['loss_total'])[0])) < REL


def test_gradients_match_reference_params(tiny_train, tiny_inputs):
  """Gradients of loss_total w.r.t. head parameters that depend on the
  criterion's input only through one slice (chain rule by hand).  The aux
  branch's bias checks that the 1-to-k assignment and the alignment targets
  are detached as in the reference."""
  t = tiny_train
  gc, gb = _grads(_args(t, tiny_inputs))
  gc = np.asarray(gc, np.float64)
  gb = np.asarray(gb, np.float64)
  nd = NUM_DENSE

  def check(name, got):
    exp = t['grad/' + name].astype(np.float64)
    err = np.abs(got - exp).max() / np.abs(exp).max()
    assert err < 1e-3, (name, err)

  check('bbox_head.aux_cls_branches.0.bias', gc[0, :, -nd:].sum((0, 1)))
  h = t['hidden_states'].astype(np.float64)
  check('bbox_head.cls_branches.0.weight',
        np.einsum('bqk,bqc->kc', gc[0, :, :-nd], h[0, :, :-nd]))
  # reg_branches[1] feeds layer 1's boxes and (undetached, through the
  # decoder's intermediate references) layer 2's boxes.
  c = t['all_layers_bbox_preds'].astype(np.float64)
  s = lambda l: (gb[l, :, :-nd] * c[l, :, :-nd] * (1 - c[l, :, :-nd])).sum((0, 1))
  check('bbox_head.reg_branches.1.4.bias', s(1) + s(2))


def test_padding_gt_and_dn_slots_is_invisible(tiny_train, tiny_inputs,
                                             fixture_losses):
  """Extra padded gt slots (garbage content) and extra unused dn slots
  (the static generator's 2 * num_dn_queries) change nothing."""
  a = _args(tiny_train, tiny_inputs)
  rng = np.random.default_rng(0)
  b, g = a['gt_valid'].shape
  extra = 10
  a['gt_boxes'] = np.concatenate(
      [a['gt_boxes'], rng.uniform(0, 90, (b, extra, 4)).astype(np.float32)], 1)
  a['gt_labels'] = np.concatenate(
      [a['gt_labels'], rng.integers(0, 80, (b, extra))], 1)
  a['gt_valid'] = np.concatenate([a['gt_valid'], np.zeros((b, extra), bool)], 1)
  # interleave image 1's gt slots (valid ones keep their order, the dn
  # queries follow it) so the valid slots are not a prefix
  valid_at = np.sort(rng.choice(g + extra, g, replace=False))
  rest = np.setdiff1d(np.arange(g + extra), valid_at)
  perm = np.empty(g + extra, int)
  perm[valid_at] = np.arange(g)
  perm[rest] = np.arange(g, g + extra)
  for k in ('gt_boxes', 'gt_labels', 'gt_valid'):
    a[k] = a[k].copy()
    a[k][1] = a[k][1][perm]
  d_used = int(tiny_train['dn_meta_num_denoising_queries'])
  pad = 4
  for k, width in (('all_layers_cls_scores', 80), ('all_layers_bbox_preds', 4)):
    x = a[k]
    junk = rng.uniform(0.1, 0.9, x.shape[:2] + (pad, width)).astype(np.float32)
    a[k] = np.concatenate([x[:, :, :d_used], junk, x[:, :, d_used:]], 2)
  out = _run(a)
  for k, v in fixture_losses.items():
    assert _rel(out[k], v) < REL, (k, out[k], v)


def _distinct_only(cls, box, mask, gt_boxes, gt_labels, gt_valid, img_shapes):
  cost = S.distinct_match_cost(
      cls, box, gt_boxes=gt_boxes, gt_labels=gt_labels, gt_valid=gt_valid,
      img_shapes=img_shapes, cfg=CFG)
  assigned = hungarian_match_batched(cost, row_valid=mask, col_valid=gt_valid,
                                     solver=CFG.solver)
  assigned = jnp.where(mask, assigned, -1)
  return np.array(S.set_loss(cls, box, assigned, query_mask=mask,
                             gt_boxes=gt_boxes, gt_labels=gt_labels,
                             img_shapes=img_shapes, cfg=CFG))


@pytest.mark.parametrize('keep', ['one', 'two', 'half'])
def test_masked_equals_indexed(tiny_train, tiny_inputs, keep):
  """Non-distinct queries masked == the reference's boolean indexing (one
  image; 'one'/'two' kept queries: fewer distinct queries than gt)."""
  t, i = tiny_train, tiny_inputs
  img, layer = 0, 2
  cls = t['all_layers_cls_scores'][layer, img:img + 1, 36:66]
  box = t['all_layers_bbox_preds'][layer, img:img + 1, 36:66]
  q = cls.shape[1]
  mask = np.zeros((1, q), bool)
  sel = {'one': [7], 'two': [3, 20], 'half': list(range(0, q, 2))}[keep]
  mask[0, sel] = True
  gt = dict(gt_boxes=jnp.asarray(i['gt_boxes'][img:img + 1]),
            gt_labels=jnp.asarray(i['gt_labels'][img:img + 1], jnp.int32),
            gt_valid=jnp.asarray(i['gt_valid'][img:img + 1]),
            img_shapes=jnp.asarray(i['img_shapes'][img:img + 1]))
  masked = _distinct_only(jnp.asarray(cls), jnp.asarray(box), jnp.asarray(mask),
                          **gt)
  indexed = _distinct_only(jnp.asarray(cls[:, sel]), jnp.asarray(box[:, sel]),
                           jnp.ones((1, len(sel)), bool), **gt)
  np.testing.assert_allclose(masked, indexed, rtol=1e-6)


def _edge_args(t, i, case):
  a = _args(t, i)
  a = {k: np.array(v) for k, v in a.items()}
  if case == 'image_without_gt':
    a['gt_valid'][1] = False
  elif case == 'max_gt_and_none':
    a['gt_valid'][0] = True
    a['gt_valid'][1] = False
  elif case == 'no_gt_at_all':
    a['gt_valid'][:] = False
  elif case == 'zero_area_gt':
    a['gt_boxes'][0, 0, 2] = a['gt_boxes'][0, 0, 0]
    a['gt_boxes'][0, 1, 2:] = a['gt_boxes'][0, 1, :2]
    a['gt_boxes'][1, 0] = 0.0
  elif case == 'fewer_distinct_than_gt':
    a['distinct_masks'][:] = False
    a['distinct_masks'][:, :, [4, 11]] = True
  elif case == 'saturated_logits':   # sigmoid == 0 or 1 exactly in float32
    c = a['all_layers_cls_scores']
    c[:, :, ::3] = 40.0
    c[:, :, 1::3] = -120.0
    a['aux_enc_cls_scores'][:, ::2] = 40.0
  elif case == 'all_masked_but_one':
    a['distinct_masks'][:] = False
    a['distinct_masks'][:, :, 5] = True
  return a


EDGE_CASES = ['image_without_gt', 'max_gt_and_none', 'no_gt_at_all',
              'zero_area_gt', 'fewer_distinct_than_gt', 'all_masked_but_one',
              'saturated_logits']


@pytest.mark.parametrize('case', EDGE_CASES)
def test_edge_cases_finite(tiny_train, tiny_inputs, case):
  a = _edge_args(tiny_train, tiny_inputs, case)
  out = _run(a)
  assert all(np.isfinite(v) for v in out.values()), out
  gc, gb = _grads(a)
  assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gb))
  if case == 'no_gt_at_all':
    for k, v in out.items():
      if 'cls' not in k or 'aux' in k:   # only focal on negatives remains
        assert v == 0.0, (k, v)
  if case == 'all_masked_but_one':
    # the last layer's loss sees exactly one query (positive: bbox term > 0)
    assert out['loss_bbox'] > 0 and out['d1.loss_bbox'] > 0


def test_one_compile_for_given_shapes(tiny_train, tiny_inputs):
  """The whole loss and its gradient (every term, every layer) are one jit:
  one trace/compile for the given shapes, whatever the content."""
  shape = tiny_train['all_layers_cls_scores'].shape
  for case in (None, 'image_without_gt', 'all_masked_but_one', 'no_gt_at_all'):
    a = _edge_args(tiny_train, tiny_inputs, case) if case else _args(
        tiny_train, tiny_inputs)
    losses, _ = _JIT(*_split(a))
    assert all(np.isfinite(float(v)) for v in losses.values())
  assert _TRACES.count(shape) == 1, _TRACES


def test_jax_solver_matches_reference(tiny_train, tiny_inputs):
  """The on-device (pure JAX) Hungarian solver gives the same losses."""
  cfg = dataclasses.replace(CFG, solver='jax')
  c, b, a = _split(_args(tiny_train, tiny_inputs))
  out = jax.jit(lambda c, b, a: _criterion(c, b, a, cfg=cfg))(c, b, a)
  for k, v in out.items():
    ref = float(np.ravel(tiny_train['loss/' + k])[0])
    assert _rel(float(v), ref) < REL, (k, float(v), ref)


def test_axis_name_averages_factors_across_devices(tiny_train, tiny_inputs):
  """With an axis name the averaging factors are means over the devices
  (mmdet reduce_mean): one image per 'device' (vmap with a named axis);
  loss_d = local sum / mean_d(local positives)."""
  c, b, a = _split(_args(tiny_train, tiny_inputs))
  # per-device leading axis: (2 devices, batch 1)
  split = lambda x, ax: np.stack(np.split(x, 2, axis=ax))
  cd, bd = split(c, 1), split(b, 1)
  ad = {k: split(v, 1 if k == 'distinct_masks' else 0) for k, v in a.items()}
  fn = lambda c, b, a, ax: _criterion(c, b, a, axis_name=ax)
  sharded = jax.jit(jax.vmap(lambda c, b, a: fn(c, b, a, 'dev'),
                             axis_name='dev'))(cd, bd, ad)
  alone = jax.jit(jax.vmap(lambda c, b, a: fn(c, b, a, None)))(cd, bd, ad)
  n = np.asarray(a['gt_valid']).sum(-1).astype(np.float64)   # enc: pos = n_gt
  for key in ('enc_loss_cls', 'enc_loss_bbox', 'enc_loss_iou'):
    exp = np.asarray(alone[key], np.float64) * n / n.mean()
    np.testing.assert_allclose(np.asarray(sharded[key]), exp, rtol=1e-5)


def test_config_from_project_config(tiny_config):
  cfg = CriterionConfig.from_config(tiny_config)
  # the reference's DDQ-DETR loss settings, read from the config
  assert cfg == CriterionConfig(
      num_classes=80, focal_alpha=0.25, focal_gamma=2.0, cls_weight=1.0,
      bbox_weight=5.0, iou_weight=2.0, match_cls_weight=2.0,
      match_bbox_weight=5.0, match_iou_weight=2.0, aux_num_pos=4,
      aux_alpha=1.0, aux_beta=6.0, solver=cfg.solver)
  assert cfg.solver in ('scipy', 'jax')
