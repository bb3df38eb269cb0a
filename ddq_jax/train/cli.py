"""Train DDQ-DETR.

    python -m ddq_jax train --config configs/tiny.py --workdir runs/tiny \\
        [--config.train.max_steps=100 --config.optim.lr=1e-4 ...]

Multi-host: every process runs the same command plus either
``--coordinator_address=host:port --num_processes=N --process_id=i`` or
``--multihost`` (jax.distributed.initialize() auto-detection: SLURM, TPU,
JAX_COORDINATOR_ADDRESS...).  ``--cpu_collectives=gloo`` for CPU-only
multi-process runs.  Re-running with the same workdir resumes.

The workdir belongs to one run at a time: train.py locks it
(WORKDIR/train.lock, released by the OS when the process ends), and a
second run on it stops at once naming the holder's pid and host.  A
--workdir must be new, empty or a training run's; a converted-weights
folder (pass it as --config.train.init_from) or a folder of other files is
refused before anything is written.  The terminal gets one line per
message; library tracebacks go to WORKDIR/train.log.

Exit status: 0 finished; 143 stopped by SIGTERM (preemption) and 130 by
SIGINT, each after saving a checkpoint (re-run to resume); 2 the workdir's
checkpoint has another config, a bad config value, a workdir in use or not
a training run's, or an init_from that cannot be read or does not fit the
model (--config.train.init_from_partial=True loads the tensors that fit);
3 too many non-finite steps in a row; 4 a checkpoint or the training log
could not be written (disk full) or no checkpoint could be read
(ddq_jax.train.loop); 1 anything else (its traceback in train.log).
"""
import argparse
import logging
import os
import sys

import jax

from ddq_jax import cli
from ddq_jax.compilation_cache import enable_compilation_cache
from ddq_jax.train import loop
from ddq_jax.train import workdir as workdir_lib
from ddq_jax.train.entry import run_training


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m ddq_jax train', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_config_argument(p, required=True)
  p.add_argument('--workdir', required=True,
                 help='checkpoints, TensorBoard logs and config.json; '
                 're-running with the same workdir resumes')
  p.add_argument('--multihost', action='store_true',
                 help='jax.distributed.initialize() with auto-detection')
  p.add_argument('--coordinator_address', metavar='HOST:PORT',
                 help='address of process 0 (explicit multi-process run)')
  p.add_argument('--num_processes', type=int, help='number of processes')
  p.add_argument('--process_id', type=int, help='this process')
  p.add_argument('--cpu_collectives', metavar='IMPL',
                 help="e.g. 'gloo' for CPU multi-process runs")
  return p


def main(argv=None) -> int:
  parser = _parser()
  args, overrides = cli.parse_args(parser, argv)
  config = cli.load_or_fail(parser, args.config, overrides)
  if args.coordinator_address and (args.num_processes is None or
                                   args.process_id is None):
    cli.fail(parser, '--coordinator_address needs --num_processes and '
             '--process_id')
  try:
    loop.check_train_config(config)
    workdir_lib.check_workdir(args.workdir)
  except ValueError as e:
    cli.fail(parser, str(e))
  enable_compilation_cache()
  if args.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation',
                      args.cpu_collectives)
  if args.coordinator_address:
    jax.distributed.initialize(args.coordinator_address, args.num_processes,
                               args.process_id)
  elif args.multihost or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()

  def run():
    logging.getLogger('ddq_jax').info(
        'process %d/%d, %d local / %d global devices (%s)',
        jax.process_index(), jax.process_count(), jax.local_device_count(),
        jax.device_count(), jax.devices()[0].platform)
    config.lock()
    return loop.train(config, args.workdir)

  def done(result):
    if jax.process_index() == 0:
      print({k: result[k] for k in ('step', 'compiles', 'stopped')},
            result['last_metrics'], result['eval'] or '', flush=True)
    if jax.process_count() > 1:
      jax.distributed.shutdown()

  return run_training(run, args.workdir, process_index=jax.process_index(),
                      on_result=done)


if __name__ == '__main__':
  sys.exit(main())
