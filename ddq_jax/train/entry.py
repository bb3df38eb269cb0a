"""How a training process ends: exit codes and one line on the terminal.

    code = run_training(lambda: train(config, workdir), workdir)

Shared by ``train.py`` and the fault-injection driver of the tests: the
workdir's lock is held for the whole run (``training.workdir``), the
library's records and tracebacks go to ``workdir/train.log``
(``run_log.setup_logging``), and an error ends the process with one line
and the exit code of ``loop.exit_code_for`` (1, with the traceback in the
log, for an error it does not know).
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

from ddq_jax.train import loop, run_log, workdir as workdir_lib


def _one_line(error: BaseException) -> str:
  return 'error: ' + (' '.join(str(error).split()) or type(error).__name__)


def run_training(run: Callable[[], dict], workdir: str, *,
                 process_index: int = 0, on_result=None) -> int:
  """Runs ``run()`` (the training) holding ``workdir``; returns the exit
  code.  ``on_result(result)``: called with a finished run's result."""
  main = process_index == 0
  try:
    workdir_lib.check_workdir(workdir)
    with workdir_lib.hold(workdir, enabled=main):
      log_path = run_log.setup_logging(
          workdir, main=main,
          file_name='train.log' if main else f'train.{process_index}.log')
      try:
        result = run()
      except Exception as e:  # pylint: disable=broad-except
        code = loop.exit_code_for(e)
        if code is None:
          print(run_log.report_unexpected(e, log_path), file=sys.stderr,
                flush=True)
          return 1
        logging.getLogger('ddq_jax.train').debug('stopped', exc_info=True)
        print(_one_line(e), file=sys.stderr, flush=True)
        return code
  except (workdir_lib.WorkdirError, OSError) as e:  # the lock or log file
    print(_one_line(e), file=sys.stderr, flush=True)
    return loop.EXIT_CONFIG_MISMATCH if isinstance(
        e, workdir_lib.WorkdirError) else loop.EXIT_CHECKPOINT
  if on_result is not None:
    on_result(result)
  return loop.exit_code_for(result=result)
