"""Result paths (``--out``) checked before any work, written atomically.

    check_out_file('dets.json', overwrite=False)          # predict --out
    check_out_dir('runs/eval', ('metrics.json',), overwrite=False)
    write_text('runs/eval/metrics.json', text)             # tmp + rename

Rules: the parent of ``--out`` must be an existing, writable directory; an
existing file is never replaced unless the user passed ``--overwrite``
(earlier results are kept).  Each check raises ``OutputPathError`` (a
ValueError) with one line naming the path and what to do.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


class OutputPathError(ValueError):
  """``--out`` cannot receive the results (or would replace earlier ones)."""


def pid_alive(pid: int) -> bool:
  """Whether process ``pid`` exists (one we may not signal counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _check_parent(path: str, flag: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise OutputPathError(
        f'{flag} {path}: its parent directory {parent} does not exist; '
        'create it first or choose another path')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputPathError(f'{flag} {path}: {parent} is not writable')


def check_out_file(path: str, *, overwrite: bool = False,
                   flag: str = '--out') -> None:
  """A file to be written: not a directory, parent writable, not existing
  unless ``overwrite``."""
  if os.path.isdir(path):
    raise OutputPathError(f'{flag} {path}: a directory; expected a file '
                          'path')
  _check_parent(path, flag)
  if os.path.lexists(path):
    if not overwrite:
      raise OutputPathError(
          f'{flag} {path}: exists (earlier results are kept); choose another '
          'path or pass --overwrite')
    if not os.access(path, os.W_OK):
      raise OutputPathError(f'{flag} {path}: exists and is not writable')


def check_out_dir(path: str, names, *, overwrite: bool = False,
                  flag: str = '--out') -> None:
  """A directory to receive ``names``: not a file; new (parent writable) or
  writable; none of ``names`` in it unless ``overwrite``."""
  if os.path.lexists(path) and not os.path.isdir(path):
    raise OutputPathError(f'{flag} {path}: an existing file, not a directory')
  if not os.path.isdir(path):
    _check_parent(path, flag)
    return
  if not os.access(path, os.W_OK | os.X_OK):
    raise OutputPathError(f'{flag} {path}: not writable')
  there = [n for n in names if os.path.lexists(os.path.join(path, n))]
  if there and not overwrite:
    raise OutputPathError(
        f'{flag} {path}: holds earlier results ({", ".join(there)}), which '
        'are kept; choose another directory or pass --overwrite')


def write_text(path: str, text: str) -> None:
  """Writes ``path`` through a temporary sibling and a rename: never a
  half-written result."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def temporary_dir(out: str):
  """A new directory beside ``out`` (same file system, so it can be renamed
  into place); removed on the way out unless ``publish_dir`` moved it."""
  out = os.path.abspath(out)
  tmp = tempfile.mkdtemp(prefix=f'.tmp-{os.path.basename(out)}.'
                         f'{os.getpid()}.', dir=os.path.dirname(out))
  try:
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: str, out: str, ours) -> None:
  """Moves the complete directory ``tmp`` to ``out``: a rename when ``out``
  is absent or empty; else ``out`` (holding only ``ours``, checked by the
  caller) is swapped out first and its files removed afterwards."""
  out = os.path.abspath(out)
  if os.path.isdir(out) and not os.listdir(out):
    os.rmdir(out)
  if not os.path.lexists(out):
    os.rename(tmp, out)
    return
  extra = set(os.listdir(out)) - set(ours)
  if extra:
    raise OutputPathError(f'{out}: holds {sorted(extra)[0]}, not ours; '
                          'nothing was replaced')
  old = tempfile.mkdtemp(prefix=f'.old-{os.path.basename(out)}.'
                         f'{os.getpid()}.', dir=os.path.dirname(out))
  os.rmdir(old)
  os.rename(out, old)
  os.rename(tmp, out)
  for name in os.listdir(old):
    os.remove(os.path.join(old, name))
  os.rmdir(old)
