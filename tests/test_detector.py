"""The full DDQDETR module against the golden fixtures: every inference
intermediate and the detections (infer.npz), both distinct-mask semantics,
the inference program (``serve.detect``: compile once, input validation), and the
training forward with the fixture's injected denoising queries (train.npz)."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import assert_close
from ddq_jax.compilation_cache import compile_count
from ddq_jax.config import load_config
from ddq_jax.io.conversion.mapping import match_rule, unstack_layers
from ddq_jax.losses.config import CriterionConfig
from ddq_jax.losses.criterion import ddq_criterion, total_loss
from ddq_jax.model.detector import INTERMEDIATES, build_model
from ddq_jax.model.outputs import Detections
from ddq_jax.model.variables import variable_shapes
from ddq_jax.parity.fixture_names import fixture_tensors
from ddq_jax.tree_paths import leaf_paths, path_str
from ddq_jax.serve.detect import (jit_detect_fn, normalize_canvas,
                                  validate_detect_inputs)

EXACT = ('feat_mask', 'memory_mask', 'topk_indices', 'num_kept_after_nms',
         'distinct_keep_0', 'distinct_keep_1', 'head_query_mask_0',
         'head_query_mask_1', 'det_labels', 'spatial_shapes',
         'level_start_index', 'dense_topk_indices', 'self_attn_mask_in',
         'dn_meta_num_denoising_queries', 'dn_meta_num_denoising_groups',
         'dn_meta_num_dense_queries')
INFER_INPUTS = ('images', 'pad_mask', 'img_shapes', 'scale_factors')


def _compare(out, ref, keys):
  for k in keys:
    a, e = np.asarray(out[k]), ref[k]
    if k in EXACT:
      np.testing.assert_array_equal(a, e, err_msg=k)
    elif k == 'det_bboxes':
      assert np.abs(a - e).max() <= 1e-3, (k, np.abs(a - e).max())
    elif k == 'det_scores':
      assert np.abs(a - e).max() <= 1e-5, (k, np.abs(a - e).max())
    elif k == 'output_proposals':
      np.testing.assert_array_equal(np.isinf(a), np.isinf(e), err_msg=k)
      fin = np.isfinite(e)
      assert_close(a[fin], e[fin], name=k)
    else:
      assert_close(a, e, name=k)


@pytest.fixture(scope='module')
def model(tiny_config):
  return build_model(tiny_config)


def _apply_with_intermediates(model, v, x, **kwargs):
  """(DetectorOutputs, the sown intermediates under the fixtures' names)."""
  out, state = model.apply(v, x['images'], x['pad_mask'],
                           mutable=[INTERMEDIATES], **kwargs)
  return out, fixture_tensors(state[INTERMEDIATES])


@pytest.fixture(scope='module')
def infer_run(model, tiny_variables, tiny_inputs):
  fn = jax.jit(lambda v, x: _apply_with_intermediates(
      model, v, x, img_shapes=x['img_shapes'],
      scale_factors=x['scale_factors']))
  out = fn(tiny_variables, {k: tiny_inputs[k] for k in INFER_INPUTS})
  return jax.tree.map(np.asarray, out)


@pytest.fixture(scope='module')
def infer_out(infer_run):
  return infer_run[1]


def test_outputs_are_the_intermediates(infer_run):
  """The typed outputs hold the same arrays as the sown intermediates."""
  out, inter = infer_run
  np.testing.assert_array_equal(out.cls_logits, inter['all_layers_cls_scores'])
  np.testing.assert_array_equal(out.boxes, inter['all_layers_bbox_preds'])
  np.testing.assert_array_equal(out.detections.boxes, inter['det_bboxes'])
  np.testing.assert_array_equal(out.detections.labels, inter['det_labels'])
  assert out.distinct_masks.shape[0] == 2 and out.encoder is None


def test_inference_matches_every_fixture_tensor(infer_out, tiny_infer):
  keys = sorted(tiny_infer)
  missing = [k for k in keys if k not in infer_out]
  assert not missing, missing
  _compare(infer_out, tiny_infer, keys)
  assert infer_out['det_valid'].all()


def test_kept_set_semantics_changes_only_image0_predictions(
    model, tiny_variables, tiny_inputs, infer_out, tiny_infer):
  _, out = jax.jit(lambda v, x: _apply_with_intermediates(
      model, v, x, img_shapes=x['img_shapes'],
      scale_factors=x['scale_factors'], semantics='kept_set'))(
          tiny_variables, {k: tiny_inputs[k] for k in INFER_INPUTS})
  out = jax.tree.map(np.asarray, out)
  # Same decoder states (3 layers: only the head's reading changes).
  for k in ('hidden_states', 'references', 'all_layers_cls_scores',
            'distinct_keep_0', 'distinct_keep_1', 'head_query_mask_0'):
    np.testing.assert_array_equal(out[k], infer_out[k], err_msg=k)
  keep1 = tiny_infer['distinct_keep_1']
  np.testing.assert_array_equal(out['head_query_mask_1'], keep1)
  # Image 1 (query 0 not kept): row 0 == kept set, identical detections.
  for k in ('det_bboxes', 'det_scores', 'det_labels'):
    np.testing.assert_array_equal(out[k][1], infer_out[k][1], err_msg=k)
  # Image 0: only kept queries may be detected; row0 used all 30.
  cls = infer_out['all_layers_cls_scores'][-1, 0]
  probs = 1 / (1 + np.exp(-cls.astype(np.float64)))
  probs[~keep1[0]] = -1
  expect = np.sort(probs.ravel())[::-1][:out['det_scores'].shape[1]]
  np.testing.assert_allclose(out['det_scores'][0], expect, rtol=1e-6)
  assert not np.array_equal(out['det_scores'][0], infer_out['det_scores'][0])


def test_detect_fn_compiles_once(model, tiny_config, tiny_variables,
                                 tiny_inputs, tiny_infer):
  """The one inference program on the fixture's uint8 canvases: its
  normalisation gives the reference's float images bit for bit, so its
  detections are the model's on them, and it compiles once."""
  detect = jit_detect_fn(tiny_config)
  args = (tiny_inputs['raw_images'], tiny_inputs['img_shapes'],
          tiny_inputs['scale_factors'])
  dets = detect(tiny_variables, *args)
  assert isinstance(dets, Detections)
  assert np.abs(np.asarray(dets.boxes) - tiny_infer['det_bboxes']).max() \
      <= 1e-3
  assert np.abs(np.asarray(dets.scores) - tiny_infer['det_scores']).max() \
      <= 1e-5
  np.testing.assert_array_equal(dets.labels, tiny_infer['det_labels'])
  x, pad_mask = jax.jit(lambda im, sz: normalize_canvas(
      im, sz, mean=tiny_config.data.mean, std=tiny_config.data.std))(
          *args[:2])
  np.testing.assert_array_equal(x, tiny_inputs['images'])
  np.testing.assert_array_equal(pad_mask, tiny_inputs['pad_mask'])
  # New values, same shapes: no recompilation.
  dets2 = detect(tiny_variables, *(np.ascontiguousarray(a[::-1])
                                   for a in args))
  jax.block_until_ready(dets2)
  assert compile_count(detect) == 1


@pytest.mark.parametrize('bad, message', [
    (dict(images=np.zeros((2, 8, 8, 3), np.float32)), 'images: expected dtype uint8'),
    (dict(images=np.zeros((8, 8, 3), np.uint8)), 'images: expected .N, H, W, 3.'),
    (dict(images=np.zeros((2, 8, 8, 1), np.uint8)), 'images: expected .N, H, W, 3.'),
    (dict(image_sizes=np.zeros((2, 3))), 'image_sizes: expected shape'),
    (dict(image_sizes=np.zeros((2, 2), bool)), 'image_sizes: expected a numeric'),
    (dict(scale_factors=np.zeros((1, 2))), 'scale_factors: expected shape'),
    (dict(images=[[1]]), 'images: expected an array'),
])
def test_detect_input_validation(bad, message):
  args = dict(images=np.zeros((2, 8, 8, 3), np.uint8),
              image_sizes=np.full((2, 2), 8), scale_factors=np.ones((2, 2)))
  args.update(bad)
  with pytest.raises((TypeError, ValueError), match=message):
    validate_detect_inputs(**args)


def test_detect_fn_rejects_before_tracing(tiny_config, tiny_variables):
  detect = jit_detect_fn(tiny_config)
  with pytest.raises(TypeError, match='images: expected dtype uint8'):
    detect(tiny_variables, np.zeros((1, 32, 32, 3), np.float32),
           np.full((1, 2), 32), np.ones((1, 2)))
  with pytest.raises(TypeError, match='variables'):
    detect([], np.zeros((1, 32, 32, 3), np.uint8), np.full((1, 2), 32),
           np.ones((1, 2)))
  assert compile_count(detect) == 0


TRAIN_INPUTS = ('images', 'pad_mask', 'img_shapes', 'gt_boxes', 'gt_labels',
                'gt_valid', 'dn_label_ids', 'dn_reference_points')


@pytest.fixture(scope='module')
def train_run(model, tiny_config, tiny_variables, tiny_inputs):
  """One compile: training forward + criterion, value_and_grad over every
  parameter.  Returns (total, losses, forward outputs, grads), numpy."""
  cfg = CriterionConfig.from_config(tiny_config)
  layouts = []

  def loss_fn(params, x):
    out, inter = _apply_with_intermediates(
        model, {'params': params, 'batch_stats': tiny_variables['batch_stats']},
        x, img_shapes=x['img_shapes'], train=True,
        gt_boxes=x['gt_boxes'], gt_labels=x['gt_labels'],
        gt_valid=x['gt_valid'],
        dn_inject=dict(label_ids=x['dn_label_ids'],
                       reference_points=x['dn_reference_points']))
    layouts.append(out.layout)
    losses = ddq_criterion(
        out, gt_boxes=x['gt_boxes'], gt_labels=x['gt_labels'],
        gt_valid=x['gt_valid'], img_shapes=x['img_shapes'], cfg=cfg)
    return total_loss(losses), (losses, inter)

  x = {k: tiny_inputs[k] for k in TRAIN_INPUTS}
  (total, (losses, out)), grads = jax.jit(jax.value_and_grad(
      loss_fn, has_aux=True))(tiny_variables['params'], x)
  out = dict(out, num_dn_slots=layouts[-1].num_dn,
             num_dense_queries=layouts[-1].num_dense)
  return jax.tree.map(np.asarray, (total, losses, out, grads))


@pytest.fixture(scope='module')
def train_out(train_run):
  return train_run[2]


def test_training_forward_matches_fixture(train_out, tiny_train, tiny_inputs):
  d = int(train_out['num_dn_slots'])
  d_ref = tiny_inputs['dn_label_ids'].shape[1]
  q = train_out['decoder_query_in'].shape[1]
  assert q == tiny_train['decoder_query_in'].shape[1] + d - d_ref
  assert int(train_out['num_dense_queries']) == 45
  # Our static dn slots: the reference's d_ref used slots, then unused ones.
  idx = np.concatenate([np.arange(d_ref), np.arange(d, q)])
  out = dict(train_out)
  for k in ('decoder_query_in', 'decoder_reference_in'):
    out[k] = out[k][:, idx]
  for k in ('hidden_states', 'references', 'all_layers_cls_scores',
            'all_layers_bbox_preds'):
    out[k] = out[k][:, :, idx]
  out['self_attn_mask_in'] = out['self_attn_mask_in'][idx][:, idx]
  keys = sorted(k for k in tiny_train
                if not k.startswith(('loss', 'grad')))
  missing = [k for k in keys if k not in out]
  assert not missing, missing
  _compare(out, tiny_train, keys)
  # Unused slots are invisible to every other query.
  mask = train_out['self_attn_mask_in']
  unused = np.arange(d_ref, d)
  others = np.setdiff1d(np.arange(q), unused)
  assert mask[np.ix_(others, unused)].all()


def test_training_losses_and_gradients_match_fixture(train_run, tiny_train):
  """End to end: training forward + criterion, value_and_grad over every
  parameter, against the reference's loss terms and gradients."""
  total, losses, _, grads = train_run
  ref_keys = [k for k in tiny_train if k.startswith('loss/')]
  assert sorted(k[5:] for k in ref_keys) == sorted(losses)
  for k in ref_keys:
    exp = float(np.asarray(tiny_train[k]).reshape(()))
    got = float(losses[k[5:]])
    assert abs(got - exp) <= 1e-4 * max(abs(exp), 1e-6), (k, got, exp)
  exp_total = float(tiny_train['loss_total'].reshape(()))
  assert abs(float(total) - exp_total) <= 1e-4 * abs(exp_total)
  per_layer = unstack_layers({'params': grads})['params']  # torch's names
  flat = dict(zip(leaf_paths(per_layer),
                  map(np.asarray, jax.tree.leaves(per_layer))))
  for k in (k for k in tiny_train if k.startswith('grad/')):
    name = k[5:]
    exp = tiny_train[k]
    rule, path = match_rule(name, exp.ndim)
    exp = np.asarray(rule.layout(exp), np.float64)
    got = flat[path_str(path[1:])]
    err = np.abs(got - exp).max() / np.abs(exp).max()
    assert err <= 1e-3, (name, err)
  norm = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64)))
                     for g in flat.values()))
  exp_norm = float(tiny_train['grad_global_norm'])
  assert abs(norm - exp_norm) <= 1e-3 * exp_norm, (norm, exp_norm)


def _shapes(tree):
  return dict(zip(leaf_paths(tree),
                  (tuple(x.shape) for x in jax.tree.leaves(tree))))


def test_variable_tree_equals_converted_checkpoint(tiny_config,
                                                   tiny_variables):
  """Every variable of the module (all branches, via a training init) is
  in the converted tiny checkpoint with the same shape, and vice versa."""
  assert _shapes(variable_shapes(tiny_config)) == _shapes(tiny_variables)


def test_r50_head_and_decoder_match_manifest():
  """Branch counts (L + 2 cls/reg, L aux) and decoder layers of the real
  R50 4-scale model against the published state-dict manifest."""
  path = os.path.join(os.path.dirname(__file__), 'data',
                      'state_dict_manifest_r50.json')
  with open(path) as f:
    tensors = json.load(f)['tensors']
  expected = {}
  for name, (shape, _) in tensors.items():
    if not name.startswith(('bbox_head.', 'decoder.', 'query_map',
                            'memory_trans', 'level_embed',
                            'dn_query_generator')):
      continue
    rule, p = match_rule(name, len(shape))
    layout = rule.layout(np.zeros(shape, np.float32))
    expected[path_str(p)] = tuple(layout.shape)
  got = {k: s for k, s in _shapes(unstack_layers(variable_shapes(
      load_config('ddq_r50_4scale')))).items()
         if k.split('/')[1] in ('bbox_head', 'decoder', 'query_map',
                                'memory_trans_fc', 'memory_trans_norm',
                                'level_embed', 'dn_query_generator')}
  assert got == expected
  assert sum(k.startswith('params/bbox_head/cls_branches_') and
             k.endswith('kernel') for k in got) == 8
  assert sum(k.startswith('params/bbox_head/aux_cls_branches_') and
             k.endswith('kernel') for k in got) == 6
