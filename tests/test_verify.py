"""`python -m ddq_jax verify`: the whole model against the reference, end to end.

One run covers inference (every infer.npz tensor) and training (every
train.npz intermediate, every loss term, every listed gradient)."""
import os

import numpy as np
import pytest

from ddq_jax.parity import verify
from ddq_jax.parity.compare import adjacent_swaps, compare


@pytest.fixture(scope='module')
def verified(tiny_dir, tmp_path_factory):
  dump = str(tmp_path_factory.mktemp('verify') / 'dump.npz')
  lines = []
  ok = verify.verify(tiny_dir, train=True, dump=dump, out=lines.append)
  with np.load(dump) as f:
    dumped = {k: f[k] for k in f.files}
  return ok, lines, dumped


def test_every_tensor_within_target(verified):
  ok, lines, _ = verified
  failures = [l for l in lines if l.startswith('FAIL')]
  assert ok and not failures, '\n'.join(failures)
  assert lines[-2].startswith('117 of 117')


def test_dump_uses_fixture_names(verified, tiny_infer, tiny_train):
  _, _, dumped = verified
  for key in ('det_bboxes', 'det_scores', 'det_labels', 'topk_indices',
              'distinct_keep_0', 'head_query_mask_1', 'hidden_states',
              'references', 'all_layers_cls_scores', 'all_layers_bbox_preds',
              'memory'):
    assert dumped[key].shape == tiny_infer[key].shape, key
  for key in tiny_train:
    if key.startswith(('loss/', 'grad/')):
      assert dumped[key].shape == tiny_train[key].shape, key
  np.testing.assert_array_equal(dumped['det_labels'], tiny_infer['det_labels'])


def test_cli_bad_bundle(tmp_path, capsys):
  assert verify.main([str(tmp_path)]) == 2
  assert 'checkpoint.pth' in capsys.readouterr().err


def test_ranked_indices_tolerate_near_tie_swaps_only():
  """Neighbouring ranks exchanged (scores equal to float32 rounding) are
  reported, not failed; any other difference in the ranking fails."""
  ref = np.array([[5, 9, 1, 7, -1]])
  assert adjacent_swaps([5, 1, 9, 7, -1], ref[0]) == (1, 0)
  ok = compare('topk_indices', np.array([[5, 1, 9, 7, -1]]), ref)
  assert ok.ok and 'near-tie swaps' in ok.key
  assert not compare('topk_indices', np.array([[5, 7, 1, 9, -1]]), ref).ok
  assert not compare('topk_indices', np.array([[5, 9, 1, 8, -1]]), ref).ok
  assert not compare('distinct_keep_0', np.array([[1, 0]], bool),
                     np.array([[0, 1]], bool)).ok
