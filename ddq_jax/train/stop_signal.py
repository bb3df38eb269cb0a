"""A stop request: SIGINT / SIGTERM end a training run at a step end.

    with StopSignal() as stop:
      while ...:
        step ...
        if stop.agreed():   # every process agrees (collective multi-host)
          break             # the loop saves a checkpoint on its way out
"""
from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils
import numpy as np

log = logging.getLogger('ddq_jax.train')


class StopSignal:
  """SIGINT / SIGTERM set a flag; the loop saves and stops at a step end.
  A second SIGINT raises KeyboardInterrupt as usual."""

  def __init__(self):
    self.requested = False
    self.signum = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    log.warning('signal %d: checkpoint and stop at the end of this step',
                signum)
    self.requested = True
    self.signum = self.signum or signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def agreed(self) -> bool:
    """Whether any process asked to stop (collective when multi-host)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))
