"""pre_decoder query selection vs the tiny fixture (infer.npz, train.npz)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from ddq_jax.io.conversion.mapping import unstack_layers
from ddq_jax.model import query_selection as qs
from ddq_jax.parity.fixture_names import fixture_tensors
from test_nms import ref_batched_nms

HI = jax.lax.Precision.HIGHEST


def _dense(p, x):
  return jnp.dot(x, jnp.asarray(p['kernel']), precision=HI) + p['bias']


def _branches(bh, idx, output_memory, output_proposals, *, aux=False):
  """cls_branches[idx] and reg_branches[idx] (Linear-ReLU-Linear-ReLU-Linear)
  + output_proposals."""
  pre = 'aux_' if aux else ''
  cls = _dense(bh[f'{pre}cls_branches_{idx}'], output_memory)
  h = jax.nn.relu(_dense(bh[f'{pre}reg_branches_{idx}_0'], output_memory))
  h = jax.nn.relu(_dense(bh[f'{pre}reg_branches_{idx}_2'], h))
  reg = _dense(bh[f'{pre}reg_branches_{idx}_4'], h) + output_proposals
  return cls, reg


def _enc_outputs(variables, fx, num_layers):
  bh = unstack_layers(variables)['params']['bbox_head']  # torch's names
  om = jnp.asarray(fx['output_memory'])
  op = jnp.asarray(fx['output_proposals'])
  cls, reg = _branches(bh, num_layers, om, op)
  dcls, dreg = _branches(bh, num_layers + 1, om, op)  # cls_branches[-1]
  qm = variables['params']['query_map']
  return cls, reg, dcls, dreg, (lambda x: _dense(qm, x))


def _run(cfg, fx, variables, training):
  cls, reg, dcls, dreg, qmap = _enc_outputs(variables, fx,
                                            cfg.num_decoder_layers)
  kw = dict(query_map=qmap, num_queries=cfg.num_queries,
            iou_threshold=cfg.nms_iou_threshold, pre_topk=cfg.nms_pre_topk)
  if training:
    kw.update(dense_enc_outputs_class=dcls, dense_enc_outputs_coord_unact=dreg,
              dense_topk_ratio=cfg.dense_topk_ratio)
  fn = jax.jit(lambda c, r, m: qs.pre_decoder(c, r, m, **kw))
  return fn(cls, reg, jnp.asarray(fx['memory']))


def _named(sel):
  """A selection's tensors under the fixtures' names."""
  return fixture_tensors({'selection': sel,
                          'outputs': {'encoder': sel.encoder}})


def test_pre_decoder_eval_matches_fixture(tiny_config, tiny_infer,
                                          tiny_variables):
  fx = tiny_infer
  out = _named(_run(tiny_config, fx, tiny_variables, training=False))
  assert 'dense_topk_indices' not in out
  np.testing.assert_array_equal(np.asarray(out['topk_indices']),
                                fx['topk_indices'])
  np.testing.assert_array_equal(np.asarray(out['num_kept_after_nms']),
                                fx['num_kept_after_nms'])
  assert_close(out['decoder_query_in'], fx['decoder_query_in'], name='query')
  assert_close(out['decoder_reference_in'], fx['decoder_reference_in'],
               name='reference')


def test_pre_decoder_train_matches_fixture(tiny_config, tiny_train,
                                           tiny_variables):
  fx = tiny_train
  cfg = tiny_config
  sel = _run(cfg, fx, tiny_variables, training=True)
  out = _named(sel)
  np.testing.assert_array_equal(np.asarray(out['topk_indices']),
                                fx['topk_indices'])
  np.testing.assert_array_equal(np.asarray(out['dense_topk_indices']),
                                fx['dense_topk_indices'])
  assert sel.dense.indices.shape[1] == int(fx['dn_meta_num_dense_queries'])
  d = int(fx['dn_meta_num_denoising_queries'])
  assert_close(out['decoder_query_in'], fx['decoder_query_in'][:, d:],
               name='query')
  assert_close(out['decoder_reference_in'], fx['decoder_reference_in'][:, d:],
               name='reference')
  for k in ('enc_outputs_class', 'enc_outputs_coord', 'aux_enc_outputs_class',
            'aux_enc_outputs_coord'):
    assert_close(out[f'head_in_{k}'], fx[f'head_in_{k}'], name=k)


def test_pre_decoder_pads_with_zeros():
  """Fewer survivors than queries: zero rows (logits 0, box 0.5, query 0)."""
  b, n, k, c, q = 2, 12, 3, 8, 10
  rng = np.random.default_rng(0)
  cls = jnp.asarray(rng.normal(size=(b, n, k)), jnp.float32)
  reg = jnp.zeros((b, n, 4), jnp.float32).at[1].set(
      jnp.asarray(rng.normal(size=(n, 4)) * 3, jnp.float32))
  mem = jnp.asarray(rng.normal(size=(b, n, c)), jnp.float32)
  out = qs.pre_decoder(cls, reg, mem, query_map=lambda x: x * 2 + 1,
                       num_queries=q, iou_threshold=0.8, pre_topk=n)
  # image 0: all boxes identical -> one survivor
  assert int(out.distinct.num_kept[0]) == 1
  idx = np.asarray(out.distinct.indices[0])
  assert idx[0] == int(np.argmax(np.asarray(cls[0]).max(-1))) and (idx[1:] == -1).all()
  np.testing.assert_array_equal(np.asarray(out.query[0, 1:]), 0)
  np.testing.assert_array_equal(np.asarray(out.reference_points[0, 1:]), 0.5)
  np.testing.assert_array_equal(np.asarray(out.encoder.cls_logits[0, 1:]), 0)
  assert np.isfinite(np.asarray(out.query)).all()


def _invalid_flood(rng, n, n_invalid):
  """Proposals as at the published init on a padded image: ``n_invalid``
  positions with +inf coordinates and one shared logit vector (the class
  branch of zeroed memory) that outranks every valid proposal."""
  k = 5
  logits = rng.normal(0, 1, (n, k)).astype(np.float32) - 2.0
  cxcy = rng.uniform(0.05, 0.95, (n, 2))
  wh = rng.uniform(0.02, 0.3, (n, 2))
  dup = rng.integers(0, n, n // 3)
  cxcy[: n // 3] = cxcy[dup] + rng.normal(0, 0.005, (n // 3, 2))
  wh[: n // 3] = wh[dup]
  unact = np.log(np.concatenate([cxcy, wh], -1) /
                 (1 - np.concatenate([cxcy, wh], -1))).astype(np.float32)
  invalid = np.zeros(n, bool)
  invalid[rng.choice(n, n_invalid, replace=False)] = True
  unact[invalid] = np.inf
  logits[invalid] = np.float32([3.0, -1.0, 0.5, -2.0, 1.0])
  return logits, unact, invalid


def _reference_selection(logits, unact, num_select, thr):
  """The reference's pre_decoder over *all* proposals (no candidate bound):
  batched_nms, first ``num_select`` survivors."""
  scores = np.asarray(jax.nn.sigmoid(jnp.asarray(logits.max(-1))))
  xy = np.asarray(jax.nn.sigmoid(jnp.asarray(unact)))
  boxes = np.concatenate([xy[:, :2] - xy[:, 2:] / 2,
                          xy[:, :2] + xy[:, 2:] / 2], -1)
  kept = ref_batched_nms(boxes, scores, thr)[:num_select]
  out = np.full(num_select, -1)
  out[:len(kept)] = kept
  return out


def test_invalid_proposals_enter_the_candidates_as_one():
  """Thousands of identical invalid proposals (padding, centre outside
  (0.01, 0.99)) outranking the valid ones must not fill the static top-k:
  the selection equals the NMS over all proposals, and the cut flag stays
  off; with a bound too small for the valid survivors it is raised."""
  rng = np.random.default_rng(7)
  n, num_select, thr = 400, 40, 0.8
  batch = [_invalid_flood(rng, n, n_inv) for n_inv in (300, 0)]
  logits = np.stack([b[0] for b in batch])
  unact = np.stack([b[1] for b in batch])
  mem = rng.normal(size=(2, n, 8)).astype(np.float32)
  want = np.stack([_reference_selection(l, u, num_select, thr)
                   for l, u in zip(logits, unact)])
  fn = jax.jit(lambda c, r, m, k: qs.select_queries(
      c, r, m, query_map=None, num_select=num_select, iou_threshold=thr,
      pre_topk=k), static_argnums=3)
  out = fn(logits, unact, mem, 60)
  np.testing.assert_array_equal(np.asarray(out.indices), want)
  # one invalid representative, the lowest index of the tied group
  first_invalid = np.flatnonzero(batch[0][2])[0]
  assert first_invalid in np.asarray(out.indices[0])
  assert not np.asarray(out.cut).any()
  # a bound that cannot hold num_select survivors is reported, not silent
  small = fn(logits, unact, mem, 20)
  assert np.asarray(small.cut).all()
  assert (np.asarray(small.num_kept) < num_select).all()
