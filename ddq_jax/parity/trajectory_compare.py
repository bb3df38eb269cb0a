"""Comparing a run of optimiser steps with the reference's trajectory
(``verify BUNDLE --steps N``, ``ddq_jax/parity/trajectory.py``): losses and the
gradient norm per step, and each moved parameter as a whole update within
what float32 guarantees on any host."""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from ddq_jax.parity.compare import Comparison

__all__ = ['Targets', 'compare_history', 'compare_params', 'step_errors',
           'ulp_summary', 'update_error', 'update_tolerance']


@dataclasses.dataclass(frozen=True)
class Targets:
  """The issue's targets (relative errors)."""
  loss_first: float = 1e-4   # total loss and every term at step 1
  loss_later: float = 1e-3   # ... at every later step
  grad_norm: float = 1e-3    # pre-clip global gradient norm, every step
  param: float = 1e-3        # ||ours - ref|| / ||ref - start||, last step,
                             # plus each tensor's float32 floor


def _rel(ours, ref) -> np.ndarray:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  return np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-12)


def step_errors(ours: Mapping, ref: Mapping, *, steps: int) -> list[dict]:
  """Per step: {'step', 'loss_total', 'worst_term', 'worst_term_key',
  'grad_global_norm'} relative errors over the first ``steps`` steps."""
  terms = sorted(k for k in ref if k.startswith('loss/'))
  rows = []
  for i in range(steps):
    errs = {k: float(_rel(ours[k][i], ref[k][i])) for k in terms if k in ours}
    worst = max(errs, key=errs.get) if errs else ''
    rows.append(dict(
        step=i + 1,
        loss_total=float(_rel(ours['loss_total'][i], ref['loss_total'][i])),
        worst_term=errs.get(worst, 0.0), worst_term_key=worst,
        grad_global_norm=float(_rel(ours['grad_global_norm'][i],
                                    ref['grad_global_norm'][i]))))
  return rows


def compare_history(ours: Mapping, ref: Mapping, *, steps: int,
                    targets: Targets = Targets()) -> list[Comparison]:
  """Loss total, every term and the grad norm over the first ``steps``
  steps: step 1 within ``loss_first``, later steps within ``loss_later``."""
  out = []
  keys = ['loss_total'] + sorted(k for k in ref if k.startswith('loss/'))
  for key in keys:
    if key not in ours:
      out.append(Comparison(f'{key} (not produced by us)', np.inf, 0.0, 'rel'))
      continue
    err = _rel(ours[key][:steps], ref[key][:steps])
    out.append(Comparison(f'{key} step 1', float(err[0]), targets.loss_first,
                          'rel'))
    if steps > 1:
      out.append(Comparison(f'{key} steps 2-{steps}', float(err[1:].max()),
                            targets.loss_later, 'rel'))
  err = _rel(ours['grad_global_norm'][:steps], ref['grad_global_norm'][:steps])
  out.append(Comparison(f'grad_global_norm steps 1-{steps}', float(err.max()),
                        targets.grad_norm, 'rel'))
  return out


def update_tolerance(ref_final, ref_init, *, steps: int,
                     budget: float) -> float:
  """Tolerance of ``update_error`` for one tensor: ``budget`` plus the
  float32 floor.

  Each of ``steps`` updates is stored in float32, so every element can land
  half an ulp of its own magnitude away on each step whatever the host's
  arithmetic (FMA contraction, vector widths, summation order): at most
  ``steps * ulp(|p|)`` per element.  Relative to the reference's update that
  is ``steps * rms(ulp(|p|)) / rms(delta)``, which is large where a tensor's
  lr is small against its values (the backbone's x0.1 group).  ``budget``
  covers the rest: gradients agree to float32 summation order, and Adam's
  scale-free step turns an element whose gradient is within its own
  rounding noise into an O(lr) difference of that element alone, so the
  error of the update *as a whole* is the guaranteed quantity, not each
  element's.
  """
  want = np.asarray(ref_final, np.float32)
  delta = want.astype(np.float64) - np.asarray(ref_init, np.float64)
  ulp = np.spacing(np.abs(want)).astype(np.float64)
  floor = steps * np.sqrt(np.mean(ulp ** 2)) / np.sqrt(np.mean(delta ** 2))
  return float(budget + floor)


def update_error(final, ref_final, ref_init) -> float:
  """||ours - ref|| / ||ref - init|| over one tensor (L2, float64)."""
  want = np.asarray(ref_final, np.float64)
  err = np.asarray(final, np.float64) - want
  return float(np.linalg.norm(err) /
               np.linalg.norm(want - np.asarray(ref_init, np.float64)))


def compare_params(final: Mapping, start: Mapping, ref: Mapping, *,
                   steps: int, targets: Targets = Targets()
                   ) -> list[Comparison]:
  """``param/<name>`` after the last step against the reference's.

  Args:
    final, start: our params in reference names (after the run / before).
    ref: the reference's trajectory arrays (``init/<name>``, ``param/<name>``).
    steps: optimiser steps both runs took.
  A parameter the reference did not move must be bit-identical to its
  start; the others compare the update as a whole (``update_error``)
  within ``update_tolerance`` (``targets.param`` plus the float32 floor of
  that tensor).  Per-element figures are host-dependent and only reported
  (``ulp_summary``).  Our start must equal the reference's ``init/`` exactly.
  """
  out = []
  for key in sorted(k for k in ref if k.startswith('param/')):
    name = key[len('param/'):]
    if name not in final:
      out.append(Comparison(f'{key} (no such parameter)', np.inf, 0.0, 'rel'))
      continue
    init = ref.get(f'init/{name}', start[name])
    if f'init/{name}' in ref:
      out.append(Comparison(f'init/{name}', float(np.sum(
          np.asarray(start[name]) != ref[f'init/{name}'])), 0.0, 'mismatches'))
    if np.array_equal(np.asarray(ref[key]), np.asarray(init)):
      out.append(Comparison(f'{key} (frozen)', float(np.sum(
          np.asarray(final[name]) != np.asarray(start[name]))), 0.0,
                            'mismatches'))
      continue
    out.append(Comparison(
        f'{key} (update)', update_error(final[name], ref[key], init),
        update_tolerance(ref[key], init, steps=steps, budget=targets.param),
        'rel'))
  return out


def ulp_summary(final: Mapping, ref: Mapping) -> list[str]:
  """Per moved ``param/<name>``, reported and not asserted (they depend on
  the host CPU's float32 code): entries bit-identical to the reference, the
  largest difference in float32 ulps at the tensor's largest value, the
  largest element error relative to the largest change, and what one such
  ulp is relative to that change."""
  lines = []
  for key in sorted(k for k in ref if k.startswith('param/')):
    name = key[len('param/'):]
    if name not in final or f'init/{name}' not in ref:
      continue
    want = np.asarray(ref[key], np.float32)
    ours = np.asarray(final[name], np.float32)
    change = float(np.abs(want.astype(np.float64) - ref[f'init/{name}']).max())
    if change == 0.0:
      continue
    ulp = float(np.spacing(np.abs(want).max()))
    err = float(np.abs(ours.astype(np.float64) - want).max())
    lines.append(f'     {key}: {np.mean(ours == want):.1%} bit-identical, '
                 f'max error {err / ulp:.2g} ulp of max |p| '
                 f'({err / change:.2g} of the max change); that ulp is '
                 f'{ulp / change:.2g} of the change')
  return lines
