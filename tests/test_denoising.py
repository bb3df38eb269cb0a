"""Static-shape CDN query generator vs the fixture's injected queries, and
the statistics of the random path."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import assert_close
from ddq_jax.model import denoising as dn


def _gen(cfg, g):
  return dn.CdnQueryGenerator(num_classes=cfg.num_classes,
                              embed_dims=cfg.embed_dims,
                              num_dn_queries=cfg.dn.num_dn_queries,
                              label_noise_scale=cfg.dn.label_noise_scale,
                              box_noise_scale=cfg.dn.box_noise_scale)


def _ref_slots(d_ref, d, q_rest):
  return np.concatenate([np.arange(d_ref), d + np.arange(q_rest)])


def test_injected_matches_fixture(tiny_config, tiny_inputs, tiny_train,
                                  tiny_variables):
  cfg, fx = tiny_config, tiny_inputs
  g = fx['gt_valid'].shape[1]
  num_dense = int(tiny_train['dn_meta_num_dense_queries'])
  gen = _gen(cfg, g)
  variables = {'params': tiny_variables['params']['dn_query_generator']}
  fn = jax.jit(lambda v, ids, pts: gen.apply(
      v, gt_boxes=fx['gt_boxes'], gt_labels=fx['gt_labels'],
      gt_valid=fx['gt_valid'], img_shapes=fx['img_shapes'],
      num_matching_queries=cfg.num_queries, num_dense_queries=num_dense,
      injected_label_ids=ids, injected_reference_points=pts))
  out = fn(variables, fx['dn_label_ids'], fx['dn_reference_points'])
  meta = out.layout
  d_ref = fx['dn_label_ids'].shape[1]
  d = out.num_slots
  assert d == 2 * max(cfg.dn.num_dn_queries, g)
  assert int(meta['num_groups']) == int(fx['dn_num_groups'])
  assert int(meta['num_denoising_queries']) == d_ref == int(
      tiny_train['dn_meta_num_denoising_queries'])
  # mask: equal to the reference on its slots, unused slots isolated
  mask = np.asarray(out.attn_mask)
  q_rest = cfg.num_queries + num_dense
  assert mask.shape == (d + q_rest, d + q_rest)
  sel = _ref_slots(d_ref, d, q_rest)
  np.testing.assert_array_equal(mask[np.ix_(sel, sel)], fx['dn_attn_mask'])
  np.testing.assert_array_equal(mask[np.ix_(sel, sel)],
                                tiny_train['self_attn_mask_in'])
  unused = np.arange(d_ref, d)
  assert mask[:, unused][~np.isin(np.arange(len(mask)), unused)].all()
  np.testing.assert_array_equal(mask[np.ix_(unused, unused)],
                                ~np.eye(len(unused), dtype=bool))
  assert (~mask).any(-1).all()  # no empty softmax row
  # label query = embedding of the ids, zero at -1
  emb = tiny_variables['params']['dn_query_generator']['label_embedding'][
      'embedding']
  ids = fx['dn_label_ids']
  expected = np.where(ids[..., None] >= 0, np.asarray(emb)[np.maximum(ids, 0)],
                      0.0)
  lq = np.asarray(out.label_query)
  np.testing.assert_array_equal(lq[:, :d_ref], expected)
  np.testing.assert_array_equal(lq[:, d_ref:], 0)
  assert_close(lq[:, :d_ref], tiny_train['decoder_query_in'][:, :d_ref],
               name='dn query')
  ref = jax.nn.sigmoid(out.bbox_query)
  assert_close(ref[:, :d_ref], tiny_train['decoder_reference_in'][:, :d_ref],
               rel=1e-5, name='dn reference points')
  # the layout marks exactly the slots whose ids are real
  np.testing.assert_array_equal(np.asarray(meta['slot_has_gt'])[:, :d_ref],
                                ids >= 0)


def _random_gt(rng, b, g, counts, hw=(96, 128)):
  h, w = hw
  xy = rng.uniform(0, 0.6, (b, g, 2)) * [w, h]
  wh = rng.uniform(0.1, 0.4, (b, g, 2)) * [w, h]
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  valid = np.arange(g)[None] < np.asarray(counts)[:, None]
  labels = rng.integers(0, 80, (b, g))
  return boxes, labels, valid, np.tile([[h, w]], (b, 1))


def test_random_path_statistics(tiny_config):
  cfg = tiny_config
  rng = np.random.default_rng(0)
  b, g = 2, 8
  boxes, labels, valid, shapes = _random_gt(rng, b, g, [5, 2])
  valid[0, 1] = False  # non-prefix validity
  valid[0, 6] = True
  gen = _gen(cfg, g)
  params = gen.init(jax.random.PRNGKey(0), gt_boxes=boxes, gt_labels=labels,
                    gt_valid=valid, img_shapes=shapes, num_matching_queries=30,
                    rng=jax.random.PRNGKey(1))
  fn = jax.jit(lambda k: gen.apply(
      params, gt_boxes=boxes, gt_labels=labels, gt_valid=valid,
      img_shapes=shapes, num_matching_queries=30, num_dense_queries=45, rng=k))
  changed, total, pos_in, neg_out, npos, nneg = 0, 0, 0, 0, 0, 0
  for i in range(30):
    out = fn(jax.random.PRNGKey(i))
    meta = out.layout
    m = 5
    assert int(meta['num_groups']) == cfg.dn.num_dn_queries // m
    has = np.asarray(meta['slot_has_gt'])
    col = np.asarray(meta['slot_gt_index'])
    lab = np.asarray(out.labels)
    gt_lab = np.take_along_axis(labels, col, 1)
    changed += (lab != gt_lab)[has].sum()
    total += has.sum()
    assert (lab[~has] == -1).all()
    bq = np.asarray(out.bbox_query)
    assert np.isfinite(bq).all() and (bq[~has] == 0).all()
    # corner offsets in units of half the box size
    box = np.asarray(jax.nn.sigmoid(bq))
    noisy = np.concatenate([box[..., :2] - box[..., 2:] / 2,
                            box[..., :2] + box[..., 2:] / 2], -1)
    f = np.concatenate([shapes[:, ::-1], shapes[:, ::-1]], -1)[:, None]
    gtn = np.take_along_axis(boxes, col[..., None], 1) / f
    whwh = np.concatenate([gtn[..., 2:] - gtn[..., :2]] * 2, -1)
    off = np.abs(noisy - gtn) / (whwh / 2)
    # no clamping to the image and no inverted (negative-size) box
    unclamped = (((noisy > 1e-3) & (noisy < 1 - 1e-3)).all(-1)
                 & (box[..., 2:] > 2e-3).all(-1))
    pos = np.asarray(meta['positive'])
    neg = has & ~pos
    pos_in += (off[pos & unclamped] <= 1 + 1e-3).all(-1).sum()
    npos += (pos & unclamped).sum()
    neg_out += (off[neg & unclamped] >= 1 - 1e-3).all(-1).sum()
    nneg += (neg & unclamped).sum()
  frac = changed / total
  expected = cfg.dn.label_noise_scale * 0.5 * (1 - 1 / cfg.num_classes)
  assert abs(frac - expected) < 0.05, frac
  assert pos_in == npos and neg_out == nneg and npos > 100 and nneg > 50


def test_zero_gt_no_nan(tiny_config):
  cfg = tiny_config
  b, g = 2, 4
  boxes = np.zeros((b, g, 4), np.float32)
  labels = np.zeros((b, g), np.int32)
  valid = np.zeros((b, g), bool)
  shapes = np.tile([[64, 64]], (b, 1))
  gen = _gen(cfg, g)
  kw = dict(gt_boxes=boxes, gt_labels=labels, gt_valid=valid,
            img_shapes=shapes, num_matching_queries=30, num_dense_queries=45)
  params = gen.init(jax.random.PRNGKey(0), rng=jax.random.PRNGKey(1), **kw)
  out = jax.jit(lambda k: gen.apply(params, rng=k, **kw))(
      jax.random.PRNGKey(2))
  meta = out.layout
  assert int(meta['num_groups']) == 1
  assert int(meta['num_denoising_queries']) == 0
  for x in (out.label_query, out.bbox_query):
    assert np.isfinite(np.asarray(x)).all()
    assert (np.asarray(x) == 0).all()
  mask = np.asarray(out.attn_mask)
  d = out.num_slots
  assert mask[d:, :d].all() and mask[:d, :d].sum() == d * d - d
  assert (~mask).any(-1).all()


def test_layout_many_gt():
  """More targets than num_dn_queries: one group of 2M slots."""
  valid = np.zeros((2, 12), bool)
  valid[0, :11] = True
  valid[1, :3] = True
  d = dn.num_dn_slots(num_dn_queries=10, max_gt=12)
  lay = dn.dn_layout(jnp.asarray(valid), num_dn_queries=10, num_slots=d)
  assert int(lay['num_groups']) == 1
  assert int(lay['num_denoising_queries']) == 22 <= d
  pos = np.asarray(lay['positive'])
  assert pos[0, :11].all() and not pos[0, 11:].any()
  assert pos[1, :3].all() and pos[1, 3:].sum() == 0
  np.testing.assert_array_equal(np.asarray(lay['slot_gt_index'])[0, 11:22],
                                np.arange(11))
