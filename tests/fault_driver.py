"""Runs the training loop on the stand-in model as its own process (the
fault-injection tests kill it, corrupt its checkpoints and resume).

    python tests/fault_driver.py WORKDIR [KEY=VALUE ...]

Run it with PYTHONPATH=<repository root>.  KEY=VALUE set ``config.train`` entries (Python literals), e.g.
``max_steps=12 checkpoint_every=2 inject_nan_at_steps=(3,)``;
``step_sleep=0.1`` makes each batch take that long (so a kill lands at a
random moment of a run).  Exits with ``loop.exit_code_for``.  Per-step
losses land in WORKDIR/metrics.jsonl.
"""
import ast
import logging
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import standin  # noqa: E402

from ddq_jax.train import loop  # noqa: E402
from ddq_jax.train.entry import run_training  # noqa: E402
from ddq_jax.train.loop import Components  # noqa: E402


class Batches:
  """Deterministic-by-step stand-in data (batch ``step`` of 8)."""
  steps_per_epoch = standin.STEPS_PER_EPOCH

  def __init__(self, start, pidx, pcount, sleep=0.0):
    self.step, self.pidx, self.pcount, self.sleep = start, pidx, pcount, sleep

  def __next__(self):
    if self.sleep:
      time.sleep(self.sleep)
    b = standin.make_batch(self.step, 8, process_index=self.pidx,
                           process_count=self.pcount)
    self.step += 1
    return b

  def set_state(self, s):
    self.step = int(s['step'])


def make_config(**train):
  c = standin.config(max_steps=12, log_every=1, checkpoint_every=2,
                     keep_checkpoints=2, eval_every=0, init_from='',
                     max_nonfinite_steps=3)
  c.train.update(train)
  return c


def components(sleep=0.0):
  return Components(init_variables=standin.init_variables,
                    loss_fn=standin.loss_fn,
                    make_iterator=lambda s, i, n: Batches(s, i, n, sleep))


def main(argv):
  """As train.py's main: the workdir lock, train.log, one line and the
  exit code of ``loop.exit_code_for`` on an error."""
  workdir, overrides = argv[0], {}
  for kv in argv[1:]:
    k, v = kv.split('=', 1)
    overrides[k] = ast.literal_eval(v)
  sleep = float(overrides.pop('step_sleep', 0.0))

  def run():
    logging.getLogger('ddq_jax').info('fault driver pid %d', os.getpid())
    return loop.train(make_config(**overrides), workdir,
                      components=components(sleep))

  def done(result):
    print('result', result['step'], result['stopped'], flush=True)

  return run_training(run, workdir, on_result=done)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
