"""The run's logs on process 0: metrics.jsonl, TensorBoard scalars and
images, drawings as PNGs, a tqdm bar.  A write that fails (disk full, ...)
raises ``OutputWriteError``, one line (train.py exits 4); the library's
traceback goes to the log only.

    logger = RunLogger(workdir, total_steps, initial_step)
    logger.scalars(step, {'loss': 0.5})
    logger.images(step, [('image_7', rgb)])  # drawings/step_<step>/image_7.png
    logger.close()
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary
from tqdm import tqdm

from ddq_jax.serve.drawing import png_bytes, write_png

log = logging.getLogger('ddq_jax.train')


class OutputWriteError(OSError):
  """The training log (metrics.jsonl / TensorBoard) could not be written."""


def _writing(what: str):
  """A decorator: an OSError (disk full, ...) -> OutputWriteError naming
  ``what``; the library's traceback goes to the log only."""
  def wrap(fn):
    def run(self, *a, **k):
      try:
        return fn(self, *a, **k)
      except OSError as e:
        if isinstance(e, OutputWriteError):
          raise
        log.debug('writing %s failed', what, exc_info=True)
        raise OutputWriteError(
            e.errno, f'cannot write {what} in {self.workdir}: '
            f'{e.strerror or e}; the newest checkpoint is kept (free space, '
            'then re-run to resume)') from None
    return run
  return wrap


class RunLogger:
  """tqdm bar + tensorboardX scalars on process 0; no-ops elsewhere.  A
  failed write raises OutputWriteError (train.py: exit 4)."""

  @_writing('metrics.jsonl / tb')
  def __init__(self, workdir, total, initial):
    self.workdir = workdir
    self.main = jax.process_index() == 0
    self.bar = self.tb = self.jsonl = None
    if not self.main:
      return
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
    except ImportError:
      log.warning('tensorboardX not installed: no tb scalars')
    self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True,
                    desc='train')

  def _tb_alive(self) -> bool:
    """False once tensorboardX's writer thread died (a failed write)."""
    worker = getattr(getattr(getattr(self.tb, 'file_writer', None),
                             'event_writer', None), '_worker', None)
    return worker is None or worker.is_alive()

  @_writing('metrics.jsonl / tb')
  def scalars(self, step, values: dict, prefix='train/'):
    if self.tb is not None and not self._tb_alive():
      self.tb = None
      raise OSError('the TensorBoard writer thread stopped (see train.log)')
    if self.jsonl is not None:
      self.jsonl.write(json.dumps(
          {'step': int(step), **{prefix + k: float(v)
                                 for k, v in values.items()}}) + '\n')
      self.jsonl.flush()
    if self.tb is not None:
      for k, v in values.items():
        if np.isfinite(float(v)):  # non-finite steps: logged, in the jsonl
          self.tb.add_scalar(prefix + k, float(v), step)
      self.tb.flush()

  @_writing('drawings / tb')
  def images(self, step, images):
    """``images`` [(name, (h, w, 3) uint8 RGB)] -> ``workdir/drawings/
    step_<step>/<name>.png`` and TensorBoard (``eval/drawings/<name>``)."""
    if not self.main or not images:
      return
    out = os.path.join(self.workdir, 'drawings', f'step_{int(step)}')
    os.makedirs(out, exist_ok=True)
    for name, rgb in images:
      write_png(os.path.join(out, f'{name}.png'), rgb)
      if self.tb is not None:  # the PNG as is (add_image would need PIL)
        image = Summary.Image(height=rgb.shape[0], width=rgb.shape[1],
                              colorspace=3,
                              encoded_image_string=png_bytes(rgb))
        self.tb.file_writer.add_summary(Summary(value=[Summary.Value(
            tag=f'eval/drawings/{name}', image=image)]), int(step))
    if self.tb is not None:
      self.tb.flush()

  def update(self, n, postfix=None):
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def close(self, *, quiet: bool = False):
    """Closes everything; ``quiet``: after a failure, a failed flush is
    logged, not raised."""
    for part in (self.jsonl, self.bar, self.tb):
      if part is None:
        continue
      try:
        part.close()
      except OSError as e:
        if not quiet:
          self.jsonl = self.bar = self.tb = None
          raise OutputWriteError(e.errno, f'cannot write metrics.jsonl / tb '
                                 f'in {self.workdir}: {e.strerror or e}'
                                 ) from None
        log.debug('closing the logs failed', exc_info=True)
    self.jsonl = self.bar = self.tb = None


# ------------------------------------------------------- terminal and file
class _NoTraceback(logging.Formatter):
  """One line per record: no traceback, no stack (they go to the file)."""

  def format(self, record):
    record = logging.makeLogRecord(record.__dict__)
    record.exc_info = record.exc_text = record.stack_info = None
    return super().format(record).split('\n', 1)[0]


def setup_logging(workdir: str, *, main: bool = True,
                  file_name: str = 'train.log') -> str:
  """The terminal gets ddq_jax's records as one line each (INFO on the main
  process, WARNING elsewhere); ``workdir/file_name`` gets every logger's
  records with their tracebacks (absl / orbax included), and so do
  exceptions of other threads and of atexit callbacks.  Returns the log file's path."""
  path = os.path.join(workdir, file_name)
  os.makedirs(workdir, exist_ok=True)  # a non-main process may come first
  logging.raiseExceptions = False  # a full disk must not print tracebacks
  root = logging.getLogger()
  for h in list(root.handlers):
    root.removeHandler(h)
  root.setLevel(logging.INFO)
  fmt = '%(asctime)s %(name)s %(levelname)s %(message)s'
  to_file = logging.FileHandler(path)
  to_file.setFormatter(logging.Formatter(fmt))
  root.addHandler(to_file)
  term = logging.StreamHandler()
  term.setFormatter(_NoTraceback(fmt))
  term.setLevel(logging.INFO if main else logging.WARNING)
  term.addFilter(lambda r: r.name.startswith('ddq_jax'))
  root.addHandler(term)
  absl = logging.getLogger('absl')  # orbax logs through absl: its INFO is
  absl.propagate = True             # a line per array; warnings and up
  absl.setLevel(logging.WARNING)

  def thread_failed(args):
    logging.getLogger('ddq_jax.thread').debug(
        'thread %s failed', getattr(args.thread, 'name', '?'),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
  threading.excepthook = thread_failed

  def unraisable(args):  # e.g. an atexit flush of tensorboardX on a full disk
    logging.getLogger('ddq_jax.thread').debug(
        'ignored: %s', args.err_msg or 'exception', exc_info=(
            args.exc_type, args.exc_value, args.exc_traceback))
  sys.unraisablehook = unraisable
  return path


def report_unexpected(error: BaseException, log_path: str) -> str:
  """Writes ``error``'s traceback to the log; returns the one line for the
  terminal."""
  logging.getLogger('ddq_jax.train').debug('unexpected error', exc_info=(
      type(error), error, error.__traceback__))
  text = ' '.join(str(error).split()) or type(error).__name__
  return (f'error: {type(error).__name__}: {text[:400]} (the traceback is in '
          f'{log_path})')
