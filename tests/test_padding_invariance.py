"""Padding invariance: an image on any canvas, next to any other image, gives
the reference's batch-1 unpadded result (tiny_single/a, b: 77x131, 139x83,
no side a multiple of any stride; the Swin model on the same images:
tiny_swin_single).

Both images share one batch on canvases that no stride divides, that only
the small strides divide, and one much larger than either image; every
per-query tensor and the detections must equal the fixture within the parity
targets (ddq_jax/parity/compare.py), token-indexed tensors over the valid region (canvas_parity).
"""
import json
import os

import jax
import numpy as np
import optax
import pytest

from ddq_jax.config import load_config
from ddq_jax.data import transforms as T
from ddq_jax.data.batching import eval_canvases, fits_any, padding_overhead
from ddq_jax.io.conversion.converter import convert_checkpoint
from ddq_jax.io.weights import load_weights
from ddq_jax.model.detector import INTERMEDIATES, build_model
from ddq_jax.model.extents import extent_valid, image_extents
from ddq_jax.model.multiscale import level_masks, level_masks_from_extents
from ddq_jax.model.resnet import ResNet
from ddq_jax.parity import verify
from ddq_jax.parity.canvas import place_in_canvas, tie_ordered_detections, unpadded_view
from ddq_jax.parity.compare import compare
from ddq_jax.parity.fixture_names import fixture_tensors
from ddq_jax.serve import predict
from ddq_jax.train.checkpoint import Checkpointer
from ddq_jax.train.state import create_train_state

SINGLE = os.path.join(os.path.dirname(__file__), 'data', 'tiny_single')
NAMES = ('a', 'b')
# (139, 131): fits both exactly, no stride divides it; (144, 200): 8 and 16
# divide, 32 and 64 do not; (320, 384): far larger than either image.
CANVASES = ((139, 131), (144, 200), (320, 384))


def _npz(path):
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope='module')
def bundles():
  return {n: (_npz(os.path.join(SINGLE, n, 'inputs.npz')),
              _npz(os.path.join(SINGLE, n, 'infer.npz'))) for n in NAMES}


@pytest.fixture(scope='module')
def invariant_apply(tiny_variables):
  config = load_config('tiny', {'padding_invariant': True})
  model = build_model(config)
  fn = jax.jit(lambda v, *a: model.apply(v, a[0], a[1], img_shapes=a[2],
                                         scale_factors=a[3],
                                         mutable=[INTERMEDIATES])[1])
  return lambda *a: fixture_tensors(
      jax.device_get(fn(tiny_variables, *a))[INTERMEDIATES])


def _batch(bundles, order, canvas):
  placed = [place_in_canvas(bundles[n][0], canvas=canvas) for n in order]
  cat = lambda k, dt: np.concatenate([p[k] for p in placed]).astype(dt)
  return (cat('images', np.float32), cat('pad_mask', bool),
          cat('img_shapes', np.int32), cat('scale_factors', np.float32))


def _image(out, i):
  """Image i of a batched output (batch axis 1 for the per-layer stacks)."""
  per_layer = ('hidden_states', 'references', 'all_layers_cls_scores',
               'all_layers_bbox_preds')
  res = {}
  for k, v in out.items():
    v = np.asarray(v)
    if k in ('spatial_shapes', 'level_start_index'):
      res[k] = v
    elif k in per_layer:
      res[k] = v[:, i:i + 1]
    elif v.ndim >= 1 and v.shape[0] > i:
      res[k] = v[i:i + 1]
  return res


@pytest.fixture(scope='module')
def canvas_runs(bundles, invariant_apply):
  """Lazy {(canvas, order): output}: one compile per canvas."""
  runs = {}

  def get(canvas, order):
    if (canvas, order) not in runs:
      runs[canvas, order] = invariant_apply(
          *_batch(bundles, ''.join(order), canvas))
    return runs[canvas, order]
  return get


def worst_errors(out, ref):
  """{key: Comparison} of every fixture tensor we produce."""
  view = unpadded_view(out, ref)
  view.update(tie_ordered_detections(view, ref))
  return {k: compare(k, view[k], ref[k]) for k in sorted(ref) if k in view}


# The same canvas in the other order: no new compile, other neighbour.
@pytest.mark.parametrize('canvas,order', [
    (CANVASES[0], ('a', 'b')), (CANVASES[0], ('b', 'a')),
    (CANVASES[1], ('a', 'b')),
    pytest.param(CANVASES[2], ('a', 'b'), marks=pytest.mark.slow)])
def test_canvas_gives_unpadded_reference(canvas, order, canvas_runs,
                                         bundles):
  out = canvas_runs(canvas, order)
  for i, name in enumerate(order):
    ref = bundles[name][1]
    res = worst_errors(_image(out, i), ref)
    for key in ('hidden_states', 'references', 'all_layers_cls_scores',
                'all_layers_bbox_preds', 'distinct_keep_0',
                'distinct_keep_1', 'head_query_mask_0', 'head_query_mask_1',
                'topk_indices', 'memory', 'output_proposals', 'neck_feat_3',
                'backbone_feat_2', 'det_bboxes', 'det_scores', 'det_labels'):
      assert key in res, key
    bad = [r.line() for r in res.values() if not r.ok]
    assert not bad, (name, canvas, bad)


SWIN_SINGLE = os.path.join(os.path.dirname(__file__), 'data',
                           'tiny_swin_single')
SWIN_CHECKPOINT = os.path.join(os.path.dirname(__file__), 'data',
                               'tiny_swin', 'checkpoint.pth')


@pytest.fixture(scope='module')
def swin_invariant_apply():
  variables, config, _ = convert_checkpoint(SWIN_CHECKPOINT)
  config.padding_invariant = True
  model = build_model(config)
  fn = jax.jit(lambda v, *a: model.apply(v, a[0], a[1], img_shapes=a[2],
                                         scale_factors=a[3],
                                         mutable=[INTERMEDIATES])[1])
  return lambda *a: fixture_tensors(
      jax.device_get(fn(variables, *a))[INTERMEDIATES])


@pytest.mark.parametrize('order', [('a', 'b'), ('b', 'a')])
def test_swin_images_batched_on_a_canvas_give_batch1_reference(
    order, swin_invariant_apply):
  """The Swin model (tiny_swin's weights), both images in one batch on a
  canvas that no stage's window grid divides: each gets the reference's
  batch-1 result (tiny_swin_single), whichever image is its neighbour."""
  bundles = {n: (_npz(os.path.join(SWIN_SINGLE, n, 'inputs.npz')),
                 _npz(os.path.join(SWIN_SINGLE, n, 'infer.npz')))
             for n in NAMES}
  out = swin_invariant_apply(*_batch(bundles, ''.join(order), CANVASES[0]))
  for i, name in enumerate(order):
    res = worst_errors(_image(out, i), bundles[name][1])
    for key in ('backbone_feat_0', 'backbone_feat_2', 'neck_feat_3',
                'memory', 'hidden_states', 'det_bboxes', 'det_labels'):
      assert key in res, key
    bad = [r.line() for r in res.values() if not r.ok]
    assert not bad, (name, bad)


def test_batched_reference_mode_depends_on_canvas(bundles, tiny_variables,
                                                  tiny_config):
  """The switch matters: the reference's batched padding (tiny_config) does
  not give the unpadded result on a canvas with padding at every level."""
  assert not tiny_config.padding_invariant
  model = build_model(tiny_config)
  out = fixture_tensors(jax.device_get(jax.jit(
      lambda v, *a: model.apply(v, a[0], a[1], img_shapes=a[2],
                                scale_factors=a[3],
                                mutable=[INTERMEDIATES])[1])(
                                    tiny_variables,
                                    *_batch(bundles, 'ab', CANVASES[0])))[
                                        INTERMEDIATES])
  res = worst_errors(_image(out, 0), bundles['a'][1])
  assert not res['hidden_states'].ok


@pytest.mark.parametrize('h,w', [(77, 131), (139, 83), (64, 64), (1, 2),
                                 (97, 150)])
def test_extents_are_unpadded_map_sizes(h, w):
  """ceil(size / stride) is what ResNet's convs give an unpadded image."""
  net = ResNet(depth=50, base_channels=8, out_indices=(0, 1, 2, 3))
  x = jax.ShapeDtypeStruct((1, h, w, 3), np.float32)
  v = jax.eval_shape(net.init, jax.random.key(0), x)
  shapes = jax.eval_shape(lambda v, x: net.apply(v, x), v, x)
  ext = image_extents(np.zeros((1, h, w), bool))
  for stride, s in zip(net.out_strides, shapes):
    valid = extent_valid(ext, stride=stride, shape=s.shape[1:3])
    assert bool(valid.all()), (stride, s.shape)


def test_level_masks_from_extents_equal_nearest_when_strides_divide():
  """Where every stride divides the canvas and the image, the extents give
  the reference's nearest-resized masks; where not, they differ."""
  pad = np.ones((2, 128, 192), bool)
  pad[0, :64, :128] = False
  pad[1, :128, :64] = False
  shapes = ((16, 24), (8, 12), (4, 6), (2, 3))
  strides = (8, 16, 32, 64)
  ours = level_masks_from_extents(image_extents(pad), strides=strides,
                                  spatial_shapes=shapes)
  for a, b in zip(ours, level_masks(pad, spatial_shapes=shapes)):
    np.testing.assert_array_equal(a, b)
  # 51 rows on a 100-row canvas: level 32 has ceil(51 / 32) = 2 rows at
  # batch 1, nearest resizing of the mask gives 3.
  pad = np.ones((1, 100, 64), bool)
  pad[0, :51, :64] = False
  shapes = ((13, 8), (7, 4), (4, 2), (2, 1))
  ours = level_masks_from_extents(image_extents(pad), strides=strides,
                                  spatial_shapes=shapes)
  nearest = level_masks(pad, spatial_shapes=shapes)
  assert [int((~m[0][:, 0]).sum()) for m in ours] == [7, 4, 2, 1]
  assert int((~nearest[2][0][:, 0]).sum()) == 3


def test_predict_does_not_depend_on_the_other_images(tiny_dir):
  """`predict` pads every image of a call to one canvas: an image's
  detections are the same alone and next to a larger image."""
  sample = os.path.join(os.path.dirname(predict.__file__), 'assets',
                        'sample.jpg')
  other = os.path.join(os.path.dirname(__file__), 'data', 'coco_eval_tiny',
                       'images', '000000100007.png')
  weights = os.path.join(tiny_dir, 'checkpoint.pth')
  kw = dict(weights=weights, config=load_config('tiny'), score_threshold=0.0)
  alone = predict.predict_files([sample], **kw)
  together = predict.predict_files([other, sample], **kw)
  mine = [r for r in together if r['image'] == sample]
  assert len(mine) == len(alone) == 50
  for a, b in zip(alone, mine):
    assert abs(a['score'] - b['score']) <= 2e-5, (a, b)
    if abs(a['score'] - b['score']) <= 1e-6:
      continue  # a tie may swap two detections
    assert a['category_id'] == b['category_id'], (a, b)
    np.testing.assert_allclose(a['bbox'], b['bbox'], atol=0.011)


def test_weights_from_a_train_workdir(tmp_path, tiny_variables, tiny_config):
  """--weights accepts a train.py workdir (latest step) or a step dir."""
  workdir = tmp_path / 'run'
  (workdir).mkdir()
  (workdir / 'config.json').write_text(tiny_config.to_json_best_effort())
  ck = Checkpointer(str(workdir / 'checkpoints'), async_save=False)
  state = create_train_state(jax.tree.map(np.asarray, tiny_variables),
                             optax.sgd(0.0), jax.random.key_data(
                                 jax.random.key(0)))
  for step in (3, 7):
    ck.save(state.replace(step=np.int32(step)), step=step,
            config=tiny_config, force=True)
  ck.close()
  for path in (workdir, workdir / 'checkpoints', workdir / 'checkpoints' / '7'):
    variables, config = load_weights(str(path))
    assert config.embed_dims == tiny_config.embed_dims
    a = variables['params']['level_embed']
    np.testing.assert_array_equal(np.asarray(a),
                                  tiny_variables['params']['level_embed'])
  assert json.loads((workdir / 'config.json').read_text())['name'] == 'tiny'


def test_verify_padding_invariant_on_a_larger_canvas(tiny_dir, tmp_path):
  """`verify BUNDLE --padding-invariant --canvas H W` on a batch-1 bundle."""
  bundle = tmp_path / 'a'
  bundle.mkdir()
  for name in ('inputs.npz', 'infer.npz', 'config.json'):
    os.symlink(os.path.join(SINGLE, 'a', name), bundle / name)
  os.symlink(os.path.join(tiny_dir, 'checkpoint.pth'),
             bundle / 'checkpoint.pth')
  lines = []
  assert verify.verify(str(bundle), padding_invariant=True, canvas=(97, 150),
                       out=lines.append), '\n'.join(lines)
  text = '\n'.join(lines)
  assert 'FAIL' not in text and 'hidden_states' in text
  assert 'topk_indices' in text and 'det_bboxes' in text


def test_verify_canvas_needs_padding_invariant(capsys):
  with pytest.raises(SystemExit):
    verify.main([SINGLE + '/a', '--canvas', '100', '200'])
  assert '--padding-invariant' in capsys.readouterr().err


# A COCO-like mix of original (h, w) sizes and their shares (docs/PADDING.md).
COCO_LIKE_MIX = (((480, 640), .36), ((427, 640), .24), ((425, 640), .04),
                 ((428, 640), .03), ((360, 640), .03), ((512, 640), .02),
                 ((640, 640), .03), ((640, 480), .12), ((640, 427), .09),
                 ((640, 425), .02), ((640, 360), .01), ((375, 500), .01))


def test_default_eval_canvases_hold_every_test_resized_image():
  """At most 3 canvases, every test-resized size fits one (so a COCO
  evaluation compiles at most 3 shapes), and the padding overhead on a
  COCO-like mix is lower than with the training canvases."""
  c = load_config('ddq_r50_4scale')
  canvases = eval_canvases(c.data)
  assert len(canvases) <= 3
  rng = np.random.default_rng(0)
  for h, w in rng.integers(16, 4000, size=(2000, 2)):
    shape = T.rescale_size(size_hw=(int(h), int(w)),
                           scale=tuple(c.data.test_scale))[0]
    assert fits_any(shape, canvases), shape
  shapes = [T.rescale_size(size_hw=s, scale=tuple(c.data.test_scale))[0]
            for s, _ in COCO_LIKE_MIX]
  weights = [f for _, f in COCO_LIKE_MIX]
  ours = padding_overhead(shapes, canvas_sizes=canvases, weights=weights)
  train = padding_overhead(shapes, canvas_sizes=c.data.canvas_sizes,
                           weights=weights)
  assert ours == pytest.approx(1.09, abs=0.005) and ours < train
