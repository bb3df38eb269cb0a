"""Comparing a model run on a padded canvas with the reference run on the
same image alone (batch 1, unpadded): the padding-invariance check.

    inputs = place_in_canvas(bundle_inputs, canvas=(H, W))  # pad, mask
    ours = run the model on inputs (fixture key names and layouts)
    view = unpadded_view(ours, ref)   # our tensors in the reference's layout
    view.update(tie_ordered_detections(view, ref))

Per-query tensors (decoder states, class / box outputs, distinct masks,
detections) have the same layout on any canvas.  Token-indexed tensors
(memory, proposals, positions, ``topk_indices``) are laid out on the padded
maps: they are read back over each level's valid block, in the unpadded
row-major order.  Feature maps (NCHW) are cropped to the reference's size.
Canvas metadata (``spatial_shapes``, ``level_start_index``,
``valid_ratios``) legitimately differs and is left out.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TOKEN_KEYS = ('feat_mask', 'feat_pos', 'memory', 'memory_mask',
              'output_memory', 'output_proposals')
CANVAS_KEYS = ('spatial_shapes', 'level_start_index', 'valid_ratios')
SCORE_TIE = 1e-5  # compare.py's score target: scores closer are a tie


def place_in_canvas(inputs: dict, *, canvas: Sequence[int]) -> dict:
  """A batch-1 (or batch-B) bundle's inputs on a larger (H, W) canvas:
  images zero padded (0 = the normalised padding), pad_mask True outside
  each image (``img_shapes``).  Other keys are passed through."""
  images = np.asarray(inputs['images'], np.float32)
  b, h, w, c = images.shape
  hc, wc = int(canvas[0]), int(canvas[1])
  if hc < h or wc < w:
    raise ValueError(f'canvas {(hc, wc)} is smaller than the bundle\'s '
                     f'images {(h, w)}')
  out = dict(inputs)
  out['images'] = np.zeros((b, hc, wc, c), np.float32)
  out['pad_mask'] = np.ones((b, hc, wc), bool)
  for i, (ih, iw) in enumerate(np.asarray(inputs['img_shapes'])):
    ih, iw = int(ih), int(iw)
    out['images'][i, :ih, :iw] = images[i, :ih, :iw]
    out['pad_mask'][i, :ih, :iw] = False
  return out


def _token_positions(ours_shapes, ref_shapes) -> np.ndarray:
  """For every reference token (unpadded level maps, level-major,
  row-major), its index in our canvas layout.  (N_ref,) int64."""
  idx, start = [], 0
  for (hc, wc), (hr, wr) in zip(ours_shapes, ref_shapes):
    hc, wc, hr, wr = int(hc), int(wc), int(hr), int(wr)
    if hr > hc or wr > wc:
      raise ValueError(f'reference level {(hr, wr)} larger than ours '
                       f'{(hc, wc)}')
    ys, xs = np.meshgrid(np.arange(hr), np.arange(wr), indexing='ij')
    idx.append(start + ys.reshape(-1) * wc + xs.reshape(-1))
    start += hc * wc
  return np.concatenate(idx)


def unpadded_view(ours: dict, ref: dict) -> dict:
  """Our tensors (a canvas run, fixture key names) in the layout of the
  reference's unpadded run ``ref``; keys the reference lacks and canvas
  metadata are dropped."""
  view = {}
  pos = _token_positions(np.asarray(ours['spatial_shapes']),
                         np.asarray(ref['spatial_shapes']))
  back = np.full((int(np.sum(np.prod(np.asarray(ours['spatial_shapes']),
                                     -1))),), -1, np.int64)
  back[pos] = np.arange(len(pos))
  for key, r in ref.items():
    if key not in ours or key in CANVAS_KEYS:
      continue
    x = np.asarray(ours[key])
    if key.startswith(('backbone_feat_', 'neck_feat_')):
      x = x[:, :, :r.shape[2], :r.shape[3]]
    elif key in TOKEN_KEYS:
      x = x[:, pos]
    elif key in ('topk_indices', 'dense_topk_indices'):
      x = np.where(x >= 0, back[np.maximum(x, 0)], -1)
    view[key] = x
  return view


def tie_ordered_detections(ours: dict, ref: dict, *,
                           tie: float = SCORE_TIE) -> dict:
  """Our det_* reordered within score ties to follow the reference's list:
  for each reference detection, among our unused detections whose score is
  within ``tie`` of it, take the one with its label and the nearest box.
  Detections that agree up to reordering within ties then compare equal."""
  out = {}
  keys = ('det_bboxes', 'det_scores', 'det_labels')
  if not all(k in ours and k in ref for k in keys):
    return out
  ob, os_, ol = (np.asarray(ours[k]) for k in keys)
  rb, rs, rl = (np.asarray(ref[k]) for k in keys)
  perm = np.zeros(rs.shape, np.int64)
  for i in range(rs.shape[0]):
    used = np.zeros(rs.shape[1], bool)
    for j in range(rs.shape[1]):
      cand = np.flatnonzero(~used & (np.abs(os_[i] - rs[i, j]) <= tie))
      if not len(cand):
        cand = np.flatnonzero(~used)[:1]
      cost = (np.abs(ob[i, cand] - rb[i, j]).max(-1)
              + 1e9 * (ol[i, cand] != rl[i, j]))
      k = cand[int(np.argmin(cost))]
      perm[i, j] = k
      used[k] = True
  take = lambda x: np.take_along_axis(
      x, perm.reshape(perm.shape + (1,) * (x.ndim - 2)), axis=1)
  for k, x in zip(keys, (ob, os_, ol)):
    out[k] = take(x)
  return out
