"""Host memory the process frees is kept for its next step (glibc malloc).

XLA:CPU allocates each step's temporaries afresh (the tiny training step:
96 MB; R50's: several GB).  glibc serves blocks that large with ``mmap``
and returns them to the kernel with ``munmap`` when they are freed, so
every step touches fresh pages: one page fault per 4 KiB, a third of the
tiny training step's time on the shared 2-core machine
(``benchmarks/RESULTS.md``).  ``keep_freed_memory`` makes malloc serve
them from its heap and never give the heap back: the pages of one step are
reused by the next.  The process's resident memory stays at its peak
instead of falling between steps; the peak itself does not change.

Every command calls it when it parses its arguments (``ddq_jax.cli``);
a program using the Python API may call it once at its start.  Set
``DDQ_JAX_KEEP_FREED_MEMORY=0`` to leave malloc as it is.  Without glibc
(macOS, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import os

ENV = 'DDQ_JAX_KEEP_FREED_MEMORY'
# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def keep_freed_memory() -> bool:
  """Tells glibc malloc to use no ``mmap`` blocks (``M_MMAP_MAX`` 0) and
  never to trim its heap (``M_TRIM_THRESHOLD`` the largest size); True when
  both took effect (or already had), False when disabled by ``ENV`` or
  not on glibc."""
  global _applied
  if _applied:
    return True
  if os.environ.get(ENV, '1').strip() == '0':
    return False
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  # -1 is converted to the largest size_t: the heap is never trimmed.
  _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(
      mallopt(_M_TRIM_THRESHOLD, -1))
  return _applied
