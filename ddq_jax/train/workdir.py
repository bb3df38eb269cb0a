"""A training workdir has one owner, and holds a training run only.

    check_workdir(workdir)        # refuses a converted-weights folder or
                                  # one holding other files (WorkdirError)
    with hold(workdir):           # the OS lock; a second run stops at once
      ...                         # naming the holder's pid and host

The lock is ``fcntl.flock`` on ``workdir/train.lock``: the OS releases it
when the holding process ends, however it ends, so a killed run never
blocks its own resume.  The holder writes its pid, host and start time
into the file for the message a second run prints.  ``hold`` is
re-entrant within one process (``train.py`` takes it before its log file
is opened, ``loop.train`` again).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time

LOCK_FILE = 'train.lock'
LOG_FILE = 'train.log'
# What train.py writes into a workdir (training/loop.py, checkpoint.py).
TRAIN_ENTRIES = frozenset((
    'config.json', 'config.json.tmp', 'checkpoints', 'checkpoints.damaged',
    'metrics.jsonl', 'tb', LOCK_FILE, LOG_FILE))
# What convert_weights.py writes (conversion/weights_io.py).
CONVERTED_MARKERS = ('variables.msgpack', 'conversion.json')

_held: dict[str, list] = {}  # realpath -> [fd, depth]


class WorkdirError(ValueError):
  """The workdir is in use by another run, or holds something else."""


_PROCESS_LOG = re.compile(r'^train\.\d+\.log$')  # other processes' logs


def foreign_entries(names) -> list[str]:
  """The names a training run never writes into its workdir."""
  return sorted(n for n in names
                if n not in TRAIN_ENTRIES and not _PROCESS_LOG.match(n))


def check_workdir(workdir: str) -> str:
  """'new' (absent or empty) or 'run' (a training run's); raises
  ``WorkdirError`` for a file, a converted-weights folder, or a directory
  holding anything else.  Nothing is written."""
  if not os.path.lexists(workdir):
    return 'new'
  if not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir {workdir}: an existing file, not a '
                       'directory; choose a new or empty directory')
  names = os.listdir(workdir)
  marker = [n for n in CONVERTED_MARKERS if n in names]
  if marker:
    raise WorkdirError(
        f'--workdir {workdir}: a converted-weights folder ({marker[0]}); '
        'nothing was written.  To start from these weights pass '
        f'--config.train.init_from={workdir} and choose a new --workdir')
  other = foreign_entries(names)
  if other:
    raise WorkdirError(
        f'--workdir {workdir}: holds {len(other)} entries a training run '
        f'does not write ({", ".join(other[:3])}); nothing was written.  '
        'Choose a new or empty directory, or a training run to resume')
  return 'run' if names else 'new'


def holder_of(path: str) -> str:
  """The 'pid P on host H since T' recorded in a lock file (or a note)."""
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    text = ''
  return text or 'a process that has not recorded its pid yet'


def _acquire(workdir: str) -> int:
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    raise WorkdirError(
        f'--workdir {workdir} is in use by another training run '
        f'({holder_of(path)}); wait for it to end or choose another '
        '--workdir') from None
  record = (f'pid {os.getpid()} on host {socket.gethostname()} since '
            f'{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}\n')
  os.ftruncate(fd, 0)
  os.pwrite(fd, record.encode(), 0)
  return fd


@contextlib.contextmanager
def hold(workdir: str, *, enabled: bool = True):
  """Holds the workdir's lock for the block (created if new).  Raises
  ``WorkdirError`` naming the holder when another process has it."""
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  key = os.path.realpath(workdir)
  if key in _held:
    _held[key][1] += 1
  else:
    _held[key] = [_acquire(workdir), 1]
  try:
    yield
  finally:
    _held[key][1] -= 1
    if not _held[key][1]:
      fd = _held.pop(key)[0]
      os.close(fd)  # releases the flock
