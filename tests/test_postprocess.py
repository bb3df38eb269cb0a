"""predict_by_feat vs infer.npz detections."""
import jax
import numpy as np

from ddq_jax.model import postprocess as pp


def _run(cfg, fx, inp, mask):
  fn = jax.jit(lambda c, b, m, s, f: pp.predict_by_feat(
      c, b, query_mask=m, img_shapes=s, scale_factors=f,
      max_per_img=cfg.max_per_img))
  return fn(fx['all_layers_cls_scores'], fx['all_layers_bbox_preds'], mask,
            inp['img_shapes'], inp['scale_factors'])


def test_predict_matches_fixture(tiny_config, tiny_infer, tiny_inputs):
  fx = tiny_infer
  last = tiny_config.num_decoder_layers - 2
  mask = fx[f'head_query_mask_{last}']
  assert mask[0].all() and not mask[1].all()  # both semantics exercised
  out = _run(tiny_config, fx, tiny_inputs, mask)
  np.testing.assert_array_equal(np.asarray(out.labels), fx['det_labels'])
  err_s = np.abs(np.asarray(out.scores) - fx['det_scores']).max()
  err_b = np.abs(np.asarray(out.boxes) - fx['det_bboxes']).max()
  assert err_s <= 1e-5, err_s
  assert err_b <= 1e-3, err_b
  assert np.asarray(out.valid).all()
  # excluded queries never appear
  qi = np.asarray(out.query_index)
  assert mask[1][qi[1]].all()


def test_predict_reference_indexing(tiny_config, tiny_infer, tiny_inputs):
  """Against a NumPy port of the reference's boolean-indexed computation."""
  fx = tiny_infer
  rng = np.random.default_rng(0)
  mask = rng.uniform(size=fx['head_query_mask_1'].shape) < 0.5
  out = _run(tiny_config, fx, tiny_inputs, mask)
  k = fx['all_layers_cls_scores'].shape[-1]
  for i in range(mask.shape[0]):
    cls = fx['all_layers_cls_scores'][-1, i][mask[i]]
    box = fx['all_layers_bbox_preds'][-1, i][mask[i]]
    s = 1 / (1 + np.exp(-cls.astype(np.float64)))
    order = np.argsort(-s.reshape(-1), kind='stable')[:tiny_config.max_per_img]
    np.testing.assert_array_equal(np.asarray(out.labels[i]), order % k)
    np.testing.assert_array_equal(np.asarray(out.query_index[i]),
                                  np.nonzero(mask[i])[0][order // k])
    b = box[order // k]
    h, w = tiny_inputs['img_shapes'][i]
    xyxy = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2],
                          -1) * [w, h, w, h]
    xyxy = np.clip(xyxy, 0, [w, h, w, h]) / np.tile(
        tiny_inputs['scale_factors'][i], 2)
    assert np.abs(np.asarray(out.boxes[i]) - xyxy).max() < 1e-3
