"""``ddq_jax.Detector``: the golden detections through the serving program
(uint8 canvas in, normalisation and mask inside), images of every kind,
compile once per canvas, bfloat16, loading errors."""
import os
import subprocess
import sys

import cv2
import ml_collections
import numpy as np
import pytest

import ddq_jax
from ddq_jax.compilation_cache import compile_count
from ddq_jax.config import load_config
from ddq_jax.data.transforms import read_image
from ddq_jax.io import weight_formats
from ddq_jax.parity.canvas import tie_ordered_detections
from ddq_jax.serve import api, detect

SAMPLE = os.path.join(os.path.dirname(api.__file__), 'assets', 'sample.jpg')


@pytest.fixture(scope='module')
def detector(tiny_dir):
  # The Detector turns padding_invariant on (tiny_config has it off for the
  # batch fixtures).
  return ddq_jax.Detector.load(os.path.join(tiny_dir, 'checkpoint.pth'),
                               config=load_config('tiny'), batch_size=2)


def test_lazy_import():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import sys, ddq_jax; assert "jax" not in sys.modules, "jax"; '
          'assert ddq_jax.Detector.__name__ == "Detector"; '
          'assert "ddq_jax.serve.api" in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True,
                 env=dict(os.environ, PYTHONPATH=root))


def test_serving_program_matches_fixture(detector):
  """raw uint8 images + sizes + scale factors -> the reference's batch-1
  detections of each image (tiny_single a and b, sharing one canvas that no
  stride divides; normalisation and padding mask computed inside)."""
  single = os.path.join(os.path.dirname(__file__), 'data', 'tiny_single')
  bundles = []
  for name in ('a', 'b'):
    with np.load(os.path.join(single, name, 'inputs.npz')) as i, \
        np.load(os.path.join(single, name, 'infer.npz')) as r:
      bundles.append(({k: i[k] for k in i.files}, {k: r[k] for k in r.files}))
  canvas = np.zeros((2, 139, 131, 3), np.uint8)
  for n, (inputs, _) in enumerate(bundles):
    h, w = inputs['img_shapes'][0]
    canvas[n, :h, :w] = inputs['raw_images'][0, :h, :w]
  dets = detector.run(
      canvas, np.concatenate([b[0]['img_shapes'] for b in bundles]),
      np.concatenate([b[0]['scale_factors'] for b in bundles]))
  for n, (_, ref) in enumerate(bundles):
    ours = tie_ordered_detections(
        dict(det_bboxes=dets.boxes[n:n + 1], det_scores=dets.scores[n:n + 1],
             det_labels=dets.labels[n:n + 1]), ref)
    assert np.abs(ours['det_bboxes'] - ref['det_bboxes']).max() <= 1e-3
    assert np.abs(ours['det_scores'] - ref['det_scores']).max() <= 1e-5
    np.testing.assert_array_equal(ours['det_labels'], ref['det_labels'])


def test_images_of_every_kind_and_one_compile_per_canvas(detector):
  rgb = read_image(SAMPLE)
  start = compile_count(detector.detect)
  one = detector(SAMPLE)
  assert isinstance(one, api.ImageDetections)
  assert len(one) == 50 and one.boxes.shape == (50, 4)
  h, w = rgb.shape[:2]
  assert (one.boxes[:, 0::2] >= 0).all() and (one.boxes[:, 0::2] <= w).all()
  assert (one.boxes[:, 1::2] >= 0).all() and (one.boxes[:, 1::2] <= h).all()
  assert list(one.scores) == sorted(one.scores, reverse=True)
  assert one.names[0] == detector.class_names[one.labels[0]]
  small = cv2.resize(rgb, (w // 2, h // 2))
  many = detector([rgb, small, SAMPLE])  # 3 images: 2 batches of 2
  np.testing.assert_allclose(many[0].boxes, one.boxes, atol=1e-4)
  np.testing.assert_allclose(many[2].scores, one.scores, atol=1e-6)
  assert (many[1].boxes[:, 2] <= w // 2 + 1e-3).all()
  assert compile_count(detector.detect) - start == 1  # one canvas, one compile
  portrait = np.ascontiguousarray(rgb.transpose(1, 0, 2))
  detector(portrait)
  assert compile_count(detector.detect) - start == 2  # the portrait canvas
  thr = detector(SAMPLE, score_threshold=float(one.scores[9]))
  assert len(thr) >= 10 and (thr.scores >= one.scores[9]).all()
  recs = one.to_records('sample.jpg')
  assert recs[0]['image'] == 'sample.jpg' and len(recs[0]['bbox']) == 4


def test_pil_image(detector):
  pil = pytest.importorskip('PIL.Image')
  rgb = read_image(SAMPLE)
  a = detector(pil.fromarray(rgb))
  np.testing.assert_allclose(a.boxes, detector(rgb).boxes, atol=1e-5)


@pytest.mark.parametrize('bad, error, message', [
    ('missing.jpg', ValueError, 'not a decodable image'),
    (np.zeros((4, 4, 3), np.float32), TypeError, 'uint8'),
    (np.zeros((4, 4, 5), np.uint8), ValueError, '(h, w, 3)'),
    (3, TypeError, 'a path, a PIL image or a numpy array'),
])
def test_bad_images(detector, bad, error, message):
  with pytest.raises(error, match=message.replace('(', r'\(').replace(
      ')', r'\)')):
    detector([bad])


def test_canvas_too_small(tiny_dir, tiny_variables, tiny_config):
  det = api.Detector(tiny_variables, tiny_config, canvas=(64, 64))
  with pytest.raises(ValueError, match='larger than the canvas'):
    det(SAMPLE)


def test_bfloat16_close_to_float32(tiny_variables, tiny_config):
  f32 = api.Detector(tiny_variables, tiny_config)(SAMPLE)
  bf16 = api.Detector(tiny_variables, tiny_config, dtype='bfloat16')(SAMPLE)
  assert bf16.boxes.dtype == np.float32 and len(bf16) == len(f32)
  # The top detection survives bf16 compute.
  assert bf16.labels[0] == f32.labels[0]
  assert abs(bf16.scores[0] - f32.scores[0]) < 0.05


def test_inference_config_sets_padding_invariant(tiny_config):
  c = tiny_config.copy_and_resolve_references()
  assert 'padding_invariant' not in detect.inference_config(c) or \
      detect.inference_config(c).padding_invariant
  with c.unlocked():
    c.padding_invariant = False
  assert detect.inference_config(c).padding_invariant is True
  assert c.padding_invariant is False
  assert isinstance(c, ml_collections.ConfigDict)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such file'):
    ddq_jax.Detector.load(str(tmp_path / 'nope.pth'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(weight_formats.UnknownWeightFormat,
                     match='empty: not a known weight format.*converted: '
                     '.*train_checkpoint: .*mmdet: '):
    ddq_jax.Detector.load(str(tmp_path / 'empty'))
