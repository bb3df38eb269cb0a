"""Loader worker lifetime: workers end with the process that started them."""
from __future__ import annotations

import os
import threading
import time

from ddq_jax.io.outputs import pid_alive


def die_with_parent(parent_pid: int, worker_index: int = 0,
                    worker_count: int = 0, *, poll_s: float = 0.5) -> None:
  """Loader-worker init: a daemon thread ends this process as soon as the
  process that started the loader (``parent_pid``) is gone (its parent pid
  changes, or ``parent_pid`` no longer exists), so a trainer killed with
  SIGKILL leaves no orphaned workers behind.  (A watchdog rather than
  PR_SET_PDEATHSIG, which fires when the creating *thread* exits.)"""
  del worker_index, worker_count
  initial = os.getppid()

  def watch():
    while os.getppid() == initial and pid_alive(parent_pid):
      time.sleep(poll_s)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True,
                   name='ddq-loader-parent-watchdog').start()
