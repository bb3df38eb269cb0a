"""Comparing our tensors with the reference's: the numeric targets of parity.

``compare(key, ours, ref)`` picks the rule for a fixture key:
  - identical: NMS keep sets, distinct masks, labels, shapes; top-k
    indices up to neighbouring ranks exchanged (near-ties in score);
  - det_bboxes: max abs error <= 1e-3 px; det_scores: <= 1e-5;
  - loss/*: relative error <= 1e-4; grad/*, grad_global_norm: <= 1e-3
    relative to the tensor's scale;
  - every other float tensor: max abs error <= 1e-4 x the tensor's scale
    (max |ref|); +inf entries (invalid proposals) must coincide.
"""
from __future__ import annotations

import dataclasses

import numpy as np

EXACT_PREFIXES = ('topk_indices', 'num_kept_after_nms', 'distinct_keep_',
                  'head_query_mask_', 'det_labels', 'spatial_shapes',
                  'level_start_index', 'feat_mask', 'memory_mask',
                  'dense_topk_indices', 'dn_meta_', 'self_attn_mask_in')


@dataclasses.dataclass
class Comparison:
  key: str
  error: float       # the measured error, in the unit the tolerance uses
  tolerance: float
  unit: str          # 'mismatches', 'abs', 'rel'

  @property
  def ok(self) -> bool:
    return self.error <= self.tolerance

  def line(self) -> str:
    mark = 'ok  ' if self.ok else 'FAIL'
    if self.unit == 'mismatches':
      return f'{mark} {self.key:<44s} {int(self.error):>10d} mismatches'
    return (f'{mark} {self.key:<44s} {self.error:10.3g} {self.unit} '
            f'(target <= {self.tolerance:g})')


def _rel_to_scale(ours, ref):
  scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)
  err = float(np.abs(ours - ref).max()) if ref.size else 0.0
  return err / scale


RANKED_INDEX_KEYS = ('topk_indices', 'dense_topk_indices',
                     'train:topk_indices', 'train:dense_topk_indices')


def adjacent_swaps(ours: np.ndarray, ref: np.ndarray) -> tuple[int, int]:
  """(swaps, other mismatches) between two rows of ranked indices.

  Two proposals whose scores agree to float32 rounding may come out of the
  sort in either order (a float32 port cannot promise the reference's
  order there); that shows as two neighbouring ranks exchanged, and the
  kept set is the same.  Anything else is a real mismatch."""
  ours, ref = np.asarray(ours).reshape(-1), np.asarray(ref).reshape(-1)
  diff = ours != ref
  swaps = 0
  i = 0
  while i < len(ours) - 1:
    if (diff[i] and diff[i + 1] and ours[i] == ref[i + 1]
        and ours[i + 1] == ref[i]):
      diff[i] = diff[i + 1] = False
      swaps += 1
      i += 2
    else:
      i += 1
  return swaps, int(diff.sum())


def compare(key: str, ours, ref) -> Comparison:
  ours = np.asarray(ours)
  ref = np.asarray(ref)
  if ours.shape != ref.shape:
    if ours.size == ref.size:
      ours = ours.reshape(ref.shape)
    else:
      return Comparison(f'{key} shape {ours.shape} vs {ref.shape}', np.inf,
                        0.0, 'abs')
  if key in RANKED_INDEX_KEYS:
    counts = [adjacent_swaps(o, r) for o, r in zip(ours.reshape(len(ours), -1),
                                                    ref.reshape(len(ref), -1))]
    swaps = sum(c[0] for c in counts)
    label = f'{key} ({swaps} near-tie swaps)' if swaps else key
    return Comparison(label, float(sum(c[1] for c in counts)), 0.0,
                      'mismatches')
  if key.startswith(EXACT_PREFIXES) or ref.dtype == np.bool_:
    return Comparison(key, float(np.sum(ours.astype(ref.dtype) != ref)), 0.0,
                      'mismatches')
  ours = ours.astype(np.float64)
  ref = ref.astype(np.float64)
  if key == 'det_bboxes':
    return Comparison(key, float(np.abs(ours - ref).max()), 1e-3, 'abs')
  if key == 'det_scores':
    return Comparison(key, float(np.abs(ours - ref).max()), 1e-5, 'abs')
  if key.startswith('loss') :
    denom = np.maximum(np.abs(ref), 1e-12)
    return Comparison(key, float((np.abs(ours - ref) / denom).max()), 1e-4,
                      'rel')
  tol = 1e-3 if key.startswith('grad') else 1e-4
  inf_ref, inf_ours = ~np.isfinite(ref), ~np.isfinite(ours)
  if inf_ref.any() or inf_ours.any():
    if (inf_ref != inf_ours).any() or (ref[inf_ref] != ours[inf_ref]).any():
      return Comparison(f'{key} (non-finite entries differ)', np.inf, tol,
                        'rel')
    finite = ~inf_ref
    return Comparison(key, _rel_to_scale(ours[finite], ref[finite]), tol,
                      'rel')
  return Comparison(key, _rel_to_scale(ours, ref), tol, 'rel')
