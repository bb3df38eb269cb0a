"""The published R50 4-scale size from a fresh initialisation, against the
reference (tests/data/published: mmdetection 3.3.0 run by
``record_reference.py`` on the weights ``init.json`` describes, the images
its ``inputs.npz`` seeds, and mmdetection's own detector-test annotations).

What it guards: on a padded image at this initialisation thousands of
invalid proposals share one score above most valid ones; they must not
crowd the static NMS candidates (the encoder loss was 800x the reference's
when they did).  The reference there was recorded with stable sorts in its
``batched_nms`` (the same arithmetic), so exact ties resolve as ours do;
``torch_sort_*.npz`` beside it is the reference as it runs, for the ties'
effect (docs/PADDING.md).

Full size on a 2-core CPU: several minutes per case, so these are slow
tests; ``python -m ddq_jax.verify tests/data/published/r50_4scale_coco
--train`` is the same check by hand.
"""
import os

import pytest

from ddq_jax import verify

PUBLISHED = os.path.join(os.path.dirname(__file__), 'data', 'published')

pytestmark = pytest.mark.slow


def _run(name, *, train):
  bundle = os.path.join(PUBLISHED, name)
  lines = []
  ok = verify.verify(bundle, train=train, out=lines.append)
  failures = [l for l in lines if l.startswith('FAIL')]
  return ok, failures, lines


def test_coco_batch_inference_and_training():
  """Both images of the padded batch: the distinct queries kept by the
  encoder NMS and after every decoder layer, the detections, every loss
  term and the listed gradients."""
  ok, failures, lines = _run('r50_4scale_coco', train=True)
  assert ok and not failures, '\n'.join(failures)
  assert any('may have cut 0 image(s)' in l for l in lines)
  assert any(l.startswith('ok   topk_indices') for l in lines)
  assert any(l.startswith('ok   train:topk_indices') for l in lines)


def test_no_ground_truth():
  """mmdetection's empty-ground-truth case: every box / iou / dn / aux
  loss exactly 0, the class losses as the reference's."""
  ok, failures, lines = _run('r50_4scale_empty', train=True)
  assert ok and not failures, '\n'.join(failures)
