"""One process of the 2-process CPU test (tests/test_multihost.py).

    python tests/multihost_worker.py PID NPROC PORT OUT_DIR RESUME_DIR

Runs the stand-in training for 4 steps on all processes' devices (batch rows
fed per process), checkpointing every 2 steps to OUT_DIR/ckpt; then restores
RESUME_DIR (a checkpoint written by a 1-process run) at step 2 and runs steps
2..3.  Process 0 writes OUT_DIR/losses.json.
"""
import json
import os
import sys

import jax

pid, nproc, port, out_dir, resume_dir = (int(sys.argv[1]), int(sys.argv[2]),
                                         int(sys.argv[3]), sys.argv[4],
                                         sys.argv[5])
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'127.0.0.1:{port}', nproc, pid,
                           initialization_timeout=120)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import standin  # noqa: E402

from ddq_jax.compilation_cache import compile_count
from ddq_jax.train.checkpoint import Checkpointer


def main():
  assert jax.process_count() == nproc, jax.process_count()
  assert len(jax.local_devices()) == 2 and len(jax.devices()) == 2 * nproc
  config = standin.config()
  s = standin.setup(config, jax.devices())
  ck = Checkpointer(os.path.join(out_dir, 'ckpt'), save_every=2, keep=None)
  _, fresh = standin.run_steps(s, s['state'], 0, 4, checkpointer=ck,
                               config=config)
  ck.close()
  state, meta = Checkpointer(resume_dir).restore(s['state'], step=2)
  _, resumed = standin.run_steps(s, state, meta['data_position'], 2)
  if pid == 0:
    with open(os.path.join(out_dir, 'losses.json'), 'w') as f:
      json.dump({'fresh': fresh.tolist(), 'resumed': resumed.tolist(),
                 'compiles': compile_count(s['step'])}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
