"""The first look: detections drawn on held-out images at each evaluation
of a training run (WORKDIR/drawings/step_N/*.png and TensorBoard), through
the evaluation's own inference program."""
import glob
import os
import struct
import types

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import standin
from ddq_jax.config import load_config
from ddq_jax.data.synthetic import SyntheticSource
from ddq_jax.io.weights import load_weights
from ddq_jax.serve.drawing import (MIN_DRAWN_SIDE, draw_detections,
                                   draw_eval_images)
from ddq_jax.train.loop import Components, default_evaluate_fn, train
from ddq_jax.train.parallel.mesh import make_mesh

TINY_PTH = os.path.join(os.path.dirname(__file__), 'data', 'tiny',
                        'checkpoint.pth')


def _source(n=6):
  return SyntheticSource(seed=0, split='validation', num_images=n, size=128,
                         num_classes=8, max_objects=4)


def _detections(source, order):
  """Per image of ``order``: its first ground-truth box at score 0.9 and a
  whole-image box at 0.1."""
  dets = []
  for i in order:
    r = source.load(i)
    x1, y1, x2, y2 = (float(v) for v in r['boxes'][0])
    h, w = r['image'].shape[:2]
    dets.append(dict(image_id=int(r['image_id']),
                     category_id=int(source.category_ids[r['labels'][0]]),
                     bbox=[x1, y1, x2 - x1, y2 - y1], score=0.9))
    dets.append(dict(image_id=int(r['image_id']), category_id=1,
                     bbox=[0.0, 0.0, float(w), float(h)], score=0.1))
  return dets


def test_draw_detections_draws_on_a_copy():
  image = np.zeros((100, 120, 3), np.uint8)
  rec = dict(bbox=[10, 20, 30, 40], category_id=2, category_name='square',
             score=0.9)
  rgb = draw_detections(image, [rec], min_side=0)
  assert rgb.shape == image.shape and rgb.dtype == np.uint8
  assert not image.any()
  assert rgb[40, 10].any() and rgb[40, 40].any()  # left and right edges
  assert not rgb[40, 25].any()                    # inside the box
  big = draw_detections(image, [rec])  # small images are drawn enlarged
  assert big.shape == (400, 480, 3) and min(big.shape[:2]) >= MIN_DRAWN_SIDE
  assert big[160, 40].any() and not big[160, 100].any()


def test_eval_images_first_evaluated_above_threshold():
  src = _source()
  order = [4, 1, 3, 0]
  drawings = draw_eval_images(
      src, _detections(src, order), score_threshold=0.3,
      image_ids=[int(src.image_ids[i]) for i in order[:2]])
  assert [name for name, _ in drawings] == [
      f'image_{int(src.image_ids[i])}' for i in order[:2]]
  names = dict(zip(src.category_ids, src.class_names))
  for (_, rgb), i in zip(drawings, order):
    image = src.load(i)['image']
    k = -(-MIN_DRAWN_SIDE // min(image.shape[:2]))
    assert rgb.shape == (image.shape[0] * k, image.shape[1] * k, 3)
    high = [d for d in _detections(src, [i]) if d['score'] >= 0.3]
    np.testing.assert_array_equal(
        rgb, draw_detections(image, high, category_names=names))
  assert draw_eval_images(src, [], image_ids=[], score_threshold=0.3) == []


def _tb_images(workdir):
  """{(tag, step)} of the image summaries in workdir/tb."""
  found = set()
  for path in glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents*')):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecord: length, crc, event, crc
      (n,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 16 + n
      for v in event.summary.value:
        if v.HasField('image'):
          found.add((v.tag, int(event.step)))
  return found


class _Iter:
  steps_per_epoch = standin.STEPS_PER_EPOCH

  def __init__(self, start, pidx, pcount):
    self.step, self.pidx, self.pcount = start, pidx, pcount

  def __next__(self):
    b = standin.make_batch(self.step, 8, process_index=self.pidx,
                           process_count=self.pcount)
    self.step += 1
    return b


def test_training_run_writes_drawings_at_each_eval(tmp_path):
  src = _source()
  dets = _detections(src, [0, 1, 2])

  def evaluate(state):
    del state
    return {'AP': 0.5}, draw_eval_images(
        src, dets, image_ids=src.image_ids[:2], score_threshold=0.3)

  config = standin.config(max_steps=6, log_every=1, checkpoint_every=6,
                          keep_checkpoints=1, eval_every=3, init_from='')
  workdir = str(tmp_path / 'run')
  train(config, workdir, components=Components(
      init_variables=standin.init_variables, loss_fn=standin.loss_fn,
      make_iterator=_Iter, evaluate_fn=evaluate))
  names = [f'image_{int(src.image_ids[i])}' for i in (0, 1)]
  for step in (3, 6):
    pngs = sorted(os.listdir(os.path.join(workdir, 'drawings',
                                          f'step_{step}')))
    assert pngs == sorted(f'{n}.png' for n in names)
  assert _tb_images(workdir) == {(f'eval/drawings/{n}', s)
                                 for n in names for s in (3, 6)}


def test_default_evaluation_draws_its_detections():
  """The training loop's evaluation: the inference program on the held-out
  split, then the first ``eval.num_drawn_images`` images drawn."""
  config = load_config('tiny', {'data.synthetic_num_eval': 3,
                                'data.num_workers': 0,
                                'eval.num_drawn_images': 2,
                                'eval.draw_score_threshold': 0.0})
  variables, config = load_weights(TINY_PTH, config)
  evaluate = default_evaluate_fn(config, mesh=make_mesh(
      None, jax.devices()[:1]))
  metrics, drawings = evaluate(types.SimpleNamespace(**variables))
  assert metrics['num_images'] == 3
  assert len(drawings) == 2
  for name, rgb in drawings:
    assert name.startswith('image_') and rgb.dtype == np.uint8
    assert min(rgb.shape[:2]) >= MIN_DRAWN_SIDE
