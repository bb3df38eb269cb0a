"""`python -m ddq_jax evaluate` at its defaults reproduces the reference's own
test loop (mmdet CocoDataset + test_pipeline + batch-1 test_step +
CocoMetric) on coco_eval_tiny: 12 images resized to a short side of 800,
batched 8 to a canvas, with padding invariance on by default.
"""
from collections import defaultdict
import json
import os

import numpy as np
import pytest

from ddq_jax.config import load_config
from ddq_jax.data import build_dataset
from ddq_jax.evaluation import cli as evaluate

DATA = os.path.join(os.path.dirname(__file__), 'data')
SET = os.path.join(DATA, 'coco_eval_tiny')
ANN = os.path.join(SET, 'annotations', 'instances_val.json')
IMAGES = os.path.join(SET, 'images')
WEIGHTS = os.path.join(DATA, 'tiny', 'checkpoint.pth')
TOP = 10  # detections per image compared one by one


def _json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('eval'))
  metrics = evaluate.main(['--weights', WEIGHTS, '--ann-file', ANN,
                           '--image-dir', IMAGES, '--out', out,
                           '--no-progress'])
  return metrics, _json(os.path.join(out, 'detections.json'))


@pytest.mark.slow
def test_twelve_metrics_equal_the_reference(default_run):
  metrics, _ = default_run
  ref = _json(os.path.join(SET, 'reference_metrics.json'))['pycocotools_stats']
  for name, value in ref.items():
    assert abs(metrics[name] - value) <= 0.002, (name, metrics[name], value)
  assert 1 <= metrics['num_compiles'] <= 3
  assert metrics['num_images'] == 12


def _per_image(dets):
  out = defaultdict(list)
  for d in dets:
    out[d['image_id']].append(d)
  for v in out.values():
    v.sort(key=lambda d: -d['score'])
  return out


IMAGE_IDS = sorted({d['image_id'] for d in _json(
    os.path.join(SET, 'reference_detections.json'))})


@pytest.mark.slow
@pytest.mark.parametrize('image_id', IMAGE_IDS)
def test_top_detections_per_image_equal_the_reference(default_run, image_id):
  _, ours = default_run
  ref = _per_image(_json(os.path.join(SET, 'reference_detections.json')))
  ours = _per_image(ours)
  assert sorted(ours) == sorted(ref)
  r, o = ref[image_id], ours[image_id]
  assert len(o) == len(r), image_id
  for a, b in zip(o[:TOP], r[:TOP]):
    assert abs(a['score'] - b['score']) <= 1e-5, (image_id, a, b)
    if abs(a['score'] - b['score']) <= 1e-7:
      continue  # a tie: either order
    assert a['category_id'] == b['category_id'], (image_id, a, b)
    np.testing.assert_allclose(a['bbox'], b['bbox'], atol=5e-3)


def test_crowd_regions_reach_the_metrics():
  """Crowd boxes are dropped from training targets but stay in the ground
  truth the metrics see (ignore regions, as in pycocotools)."""
  config = load_config('tiny', {'data.source': 'coco_dir',
                                'data.eval_ann_file': ANN,
                                'data.eval_image_dir': IMAGES})
  src = build_dataset(config, config.data.eval_split)
  raw = _json(ANN)
  crowd = [a for a in raw['annotations'] if a.get('iscrowd')]
  assert crowd
  gt = src.coco_gt()
  assert len([a for a in gt['annotations'] if a.get('iscrowd')]) == len(crowd)
  assert len(gt['annotations']) == len(raw['annotations'])
