"""COCO metrics (vs pycocotools), detections conversion, the model evaluation
end to end (CLI, tiny fixture weights, synthetic images) and its sharding."""
import json
import os

import jax
import numpy as np
import pytest

from ddq_jax.compilation_cache import compile_count
from ddq_jax.config import load_config
from ddq_jax.data import build_dataset, make_eval_iterator
from ddq_jax.evaluation import cli as evaluate
from ddq_jax.evaluation import evaluate_model
from ddq_jax.evaluation.coco_metrics import (METRIC_NAMES, coco_box_metrics,
                                             detections_to_coco, format_table,
                                             pycocotools_box_metrics)
from ddq_jax.io.weights import load_weights
from ddq_jax.serve.detect import jit_detect_fn
from ddq_jax.train.parallel.mesh import make_mesh

TINY_PTH = os.path.join(os.path.dirname(__file__), 'data', 'tiny',
                        'checkpoint.pth')


def _ground_truth(rng, n_images=12, cats=(1, 3, 7, 12)):
  images, anns = [], []
  for i in range(n_images):
    img_id = 1000 + 7 * i
    h, w = int(rng.integers(300, 640)), int(rng.integers(300, 640))
    images.append(dict(id=img_id, height=h, width=w, file_name=f'{img_id}.jpg'))
    for _ in range(int(rng.integers(0, 7))):
      side = float(rng.choice([12., 20., 45., 80., 150., 260.]))
      bw = side * float(rng.uniform(0.6, 1.4))
      bh = side * float(rng.uniform(0.6, 1.4))
      x = float(rng.uniform(0, max(1., w - bw)))
      y = float(rng.uniform(0, max(1., h - bh)))
      anns.append(dict(id=len(anns) + 1, image_id=img_id,
                       category_id=int(rng.choice(cats)),
                       bbox=[x, y, bw, bh], area=bw * bh,
                       iscrowd=int(rng.random() < 0.08)))
  return dict(images=images, annotations=anns,
              categories=[dict(id=c, name=f'c{c}') for c in cats])


def _detections(rng, gt, cats=(1, 3, 7, 12)):
  dets = []
  for a in gt['annotations']:
    if rng.random() < 0.85:  # a noisy hit, sometimes with the wrong class
      x, y, w, h = a['bbox']
      j = rng.normal(0, 0.12, 4)
      cat = a['category_id'] if rng.random() < 0.85 else int(rng.choice(cats))
      dets.append(dict(image_id=a['image_id'], category_id=cat,
                       bbox=[x + j[0] * w, y + j[1] * h, w * (1 + j[2]),
                             h * (1 + j[3])],
                       score=float(rng.uniform(0.05, 1.0))))
  for im in gt['images']:  # false positives
    for _ in range(int(rng.integers(0, 15))):
      w, h = float(rng.uniform(5, 200)), float(rng.uniform(5, 200))
      dets.append(dict(image_id=im['id'], category_id=int(rng.choice(cats)),
                       bbox=[float(rng.uniform(0, im['width'] - w)),
                             float(rng.uniform(0, im['height'] - h)), w, h],
                       score=float(rng.uniform(0.0, 0.6))))
  return dets


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_metrics_match_pycocotools(seed):
  rng = np.random.default_rng(seed)
  gt = _ground_truth(rng)
  dets = _detections(rng, gt)
  gt_before, dets_before = json.dumps(gt), json.dumps(dets)
  ours = coco_box_metrics(gt, dets)
  ref = pycocotools_box_metrics(gt, dets)
  assert json.dumps(gt) == gt_before and json.dumps(dets) == dets_before
  assert list(ours) == list(METRIC_NAMES)
  for k in METRIC_NAMES:
    assert abs(ours[k] - ref[k]) <= 1e-6, (k, ours[k], ref[k])
  assert 0.05 < ours['AP'] < 0.95  # a non-trivial case
  # a subset of the images (what --max-images evaluates)
  ids = [im['id'] for im in gt['images'][:5]]
  ours = coco_box_metrics(gt, dets, image_ids=ids)
  ref = pycocotools_box_metrics(gt, dets, image_ids=ids)
  for k in METRIC_NAMES:
    assert abs(ours[k] - ref[k]) <= 1e-6, (k, ours[k], ref[k])
  table = format_table(ours).splitlines()
  assert len(table) == 12
  assert table[0].startswith(' Average Precision  (AP) @[ IoU=0.50:0.95 | '
                             'area=   all | maxDets=100 ] = ')
  assert table[8].startswith(' Average Recall     (AR) @[ IoU=0.50:0.95 | '
                             'area=   all | maxDets=100 ] = ')


def test_metrics_perfect_and_empty():
  rng = np.random.default_rng(5)
  gt = _ground_truth(rng)
  perfect = [dict(image_id=a['image_id'], category_id=a['category_id'],
                  bbox=a['bbox'], score=1.0)
             for a in gt['annotations'] if not a['iscrowd']]
  m = coco_box_metrics(gt, perfect)
  assert m['AP'] == pytest.approx(1.0) and m['AR100'] == pytest.approx(1.0)
  m = coco_box_metrics(gt, [])
  assert m['AP'] == 0.0 and m['AR100'] == 0.0


def test_detections_to_coco():
  boxes = np.array([[[10., 20., 30., 60.], [0., 0., 5., 5.], [1., 2., 3., 4.]],
                    [[4., 4., 8., 8.], [1., 1., 2., 2.], [0., 0., 1., 1.]]],
                   np.float32)
  scores = np.array([[0.9, 0.5, 0.4], [0.8, 0.7, 0.1]], np.float32)
  labels = np.array([[2, 0, 5], [1, 1, 0]], np.int32)  # 5: no category
  valid = np.array([[True, False, True], [True, True, True]])
  dets = detections_to_coco(boxes, scores, labels, valid,
                            image_ids=np.array([42, -1]),
                            sample_valid=np.array([True, False]),
                            category_ids=[3, 9, 17])
  assert dets == [dict(image_id=42, category_id=17, bbox=[10., 20., 20., 40.],
                       score=pytest.approx(0.9))]
  assert isinstance(dets[0]['image_id'], int)
  json.dumps(dets)


# ----------------------------------------------------------- end to end


N_IMAGES, BATCH = 10, 8
OVERRIDES = ['data.canvas_sizes=((160, 160),)', f'data.synthetic_num_eval={N_IMAGES}',
             'data.num_workers=0']


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
  """The CLI on the tiny fixture weights, synthetic split, all 8 devices."""
  assert jax.device_count() == 8
  out = str(tmp_path_factory.mktemp('eval'))
  args = ['--config', 'tiny', '--weights', TINY_PTH, '--out', out,
          '--batch-size', str(BATCH), '--no-progress']
  for o in OVERRIDES:
    args.append(f'--config.{o}')
  evaluate.main(args)
  return out


def test_cli_writes_metrics_and_detections(cli_run):
  with open(os.path.join(cli_run, 'metrics.json')) as f:
    metrics = json.load(f)
  with open(os.path.join(cli_run, 'detections.json')) as f:
    dets = json.load(f)
  for k in METRIC_NAMES:
    assert -1.0 <= metrics[k] <= 1.0
  assert metrics['num_images'] == N_IMAGES  # 2 batches of 8: 6 padding dropped
  assert metrics['num_devices'] == 8
  config = load_config('tiny', {'data.synthetic_num_eval': N_IMAGES})
  src = build_dataset(config, config.data.eval_split)
  ids = {int(i) for i in src.image_ids}
  cats = set(src.category_ids)
  assert dets, 'expected some detections'
  assert metrics['num_detections'] == len(dets)
  for d in dets:
    assert d['image_id'] in ids and d['category_id'] in cats
    assert len(d['bbox']) == 4 and d['bbox'][2] >= 0 and d['bbox'][3] >= 0
    assert 0.0 <= d['score'] <= 1.0
  per_image = {}
  for d in dets:
    per_image[d['image_id']] = per_image.get(d['image_id'], 0) + 1
  assert max(per_image.values()) <= config.max_per_img


def test_sharded_equals_single_device(cli_run):
  """evaluate_model on 1 device == the CLI's 8-device run."""
  config = load_config('tiny', {'data.canvas_sizes': ((160, 160),),
                                'data.synthetic_num_eval': N_IMAGES})
  variables, config = load_weights(TINY_PTH, config)
  src = build_dataset(config, config.data.eval_split)
  it = make_eval_iterator(config, batch_size=BATCH, dataset=src, num_workers=0)
  detect = jit_detect_fn(config)
  metrics, dets = evaluate_model(detect, variables, it,
                                 mesh=make_mesh(None, jax.devices()[:1]),
                                 progress=False, print_table=False)
  with open(os.path.join(cli_run, 'metrics.json')) as f:
    sharded = json.load(f)
  with open(os.path.join(cli_run, 'detections.json')) as f:
    sharded_dets = json.load(f)
  for k in METRIC_NAMES:
    assert abs(metrics[k] - sharded[k]) <= 1e-6, k
  assert len(dets) == len(sharded_dets)
  for a, b in zip(dets, sharded_dets):
    assert (a['image_id'], a['category_id']) == (b['image_id'],
                                                 b['category_id'])
    np.testing.assert_allclose(a['bbox'], b['bbox'], atol=1e-3)
    assert abs(a['score'] - b['score']) <= 1e-5
  assert metrics['num_images'] == N_IMAGES
  assert metrics['num_compiles'] == 1 and metrics['compile_s'] > 0
  assert metrics['images_per_s'] > 0
  # max_images: whole batches run, metrics cover exactly the first N images
  it = make_eval_iterator(config, batch_size=BATCH, dataset=src, num_workers=0)
  m3, d3 = evaluate_model(detect, variables, it, max_images=3,
                          mesh=make_mesh(None, jax.devices()[:1]), progress=False,
                          print_table=False)
  assert m3['num_images'] == 3
  assert m3['num_compiles'] == 0  # same predict fn, same shapes
  ids3 = {d['image_id'] for d in d3}
  assert len(ids3) <= 3
  assert len(d3) == sum(d['image_id'] in ids3 for d in dets)
  assert compile_count(detect) == 1  # one compile for the whole run


def test_cli_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate.main(['--config', 'tiny', '--weights', TINY_PTH, '--out',
                   str(tmp_path), '--coco-dir', str(tmp_path / 'nope')])
  assert e.value.code == 2
  assert 'nope' in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    evaluate.main(['--config', 'tiny', '--weights', str(tmp_path / 'w.pth'),
                   '--out', str(tmp_path)])
  assert e.value.code == 2
  assert 'w.pth' in capsys.readouterr().err
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'not a checkpoint')
  with pytest.raises(SystemExit) as e:
    evaluate.main(['--config', 'tiny', '--weights', str(bad), '--out',
                   str(tmp_path)])
  assert e.value.code == 2
  assert 'bad.pth' in capsys.readouterr().err
