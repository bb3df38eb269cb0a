"""Train DDQ-DETR.

    python train.py --config configs/tiny.py --workdir /tmp/run \\
        [--config.train.max_steps=100 --config.optim.lr=1e-4 ...]

Multi-host: every process runs the same command plus either
``--coordinator_address=host:port --num_processes=N --process_id=i`` or
``--multihost`` (jax.distributed.initialize() auto-detection: SLURM, TPU,
JAX_COORDINATOR_ADDRESS...).  ``--cpu_collectives=gloo`` for CPU-only
multi-process runs.  Re-running with the same workdir resumes.
"""
import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'config file (get_config())',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'checkpoints, tb logs, config.json')
flags.DEFINE_bool('multihost', False, 'jax.distributed.initialize() (auto)')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
flags.DEFINE_integer('num_processes', None, 'number of processes')
flags.DEFINE_integer('process_id', None, 'this process')
flags.DEFINE_string('cpu_collectives', None, "e.g. 'gloo' for CPU multi-process")
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from ddq_jax.compilation_cache import enable_compilation_cache; enable_compilation_cache()  # pylint: disable=g-import-not-at-top,multiple-statements
  if FLAGS.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation',
                      FLAGS.cpu_collectives)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif FLAGS.multihost or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()
  # absl's handler prints; orbax's per-save INFO chatter is silenced.
  logging.getLogger('absl').setLevel(logging.WARNING)
  logging.getLogger('ddq_jax').setLevel(
      logging.INFO if jax.process_index() == 0 else logging.WARNING)
  from ddq_jax.training.loop import train  # pylint: disable=g-import-not-at-top
  logging.getLogger('ddq_jax').info(
      'process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count(),
      jax.devices()[0].platform)
  result = train(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print({k: result[k] for k in ('step', 'compiles', 'stopped')},
          result['last_metrics'], result['eval'] or '', flush=True)
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  return 0


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main)
