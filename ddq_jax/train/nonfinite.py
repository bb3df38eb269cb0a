"""Bookkeeping of non-finite training steps (the host side of the guard).

The train step (training.step) never applies an update whose loss or
gradient norm is not finite and reports ``metrics['nonfinite']``; the loop
feeds each step's host metrics here.  Every skipped step is logged with its
step and the loss terms that went bad; ``max_in_a_row`` consecutive skipped
steps raise ``NonFiniteError`` (the loop then stops without saving, so the
newest checkpoint is the last one written before the streak).
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger('ddq_jax.train')

# train.max_nonfinite_steps when the config has none.
DEFAULT_MAX_IN_A_ROW = 10
# How many skipped steps of one streak are logged one by one.
_LOGGED_PER_STREAK = 5


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


class NonFiniteGuard:
  """Counts skipped (non-finite) steps.

  Args:
    max_in_a_row: stop after this many consecutive non-finite steps
      (<= 0: never stop, only count).
  """

  def __init__(self, max_in_a_row: int = DEFAULT_MAX_IN_A_ROW):
    self.max_in_a_row = int(max_in_a_row)
    self.in_a_row = 0
    self.total = 0
    self.first_bad_step = None

  def observe(self, step: int, metrics: dict) -> bool:
    """Records step ``step``'s host metrics; returns whether it was applied.

    Raises:
      NonFiniteError: the streak reached ``max_in_a_row``.
    """
    bad = bool(metrics.get('nonfinite', 0.0)) or not math.isfinite(
        float(metrics.get('loss', 0.0)))
    if not bad:
      if self.in_a_row:
        log.warning('step %d: finite again after %d skipped steps', step,
                    self.in_a_row)
      self.in_a_row = 0
      return True
    self.in_a_row += 1
    self.total += 1
    if self.in_a_row == 1:
      self.first_bad_step = step
    terms = {k: v for k, v in metrics.items()
             if k not in ('nonfinite',) and not math.isfinite(float(v))}
    if self.in_a_row <= _LOGGED_PER_STREAK:
      first = [k for k in ('loss', 'grad_norm') if k in terms] + sorted(
          k for k in terms if k not in ('loss', 'grad_norm'))
      shown = ', '.join(f'{k}={terms[k]}' for k in first[:6])
      if len(first) > 6:
        shown += f' (+{len(first) - 6} more terms)'
      log.warning('step %d: non-finite %s; update NOT applied (%d in a row, '
                  '%d in this run)', step, shown or 'values', self.in_a_row,
                  self.total)
    if 0 < self.max_in_a_row <= self.in_a_row:
      raise NonFiniteError(
          f'{self.in_a_row} non-finite steps in a row (steps '
          f'{self.first_bad_step}..{step}, limit train.max_nonfinite_steps='
          f'{self.max_in_a_row}): training stopped; the newest checkpoint '
          'holds the last finite state (lower optim.lr or check the data, '
          'then resume)')
    return False
