"""Iterates the real training loader with grain workers and waits (the
orphan test kills it with SIGKILL).  Prints 'ready <pid>' after a batch."""
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from ddq_jax.config import load_config  # noqa: E402
from ddq_jax.data.pipeline import make_train_iterator  # noqa: E402


def main():
  c = load_config('tiny_synthetic', {'data.synthetic_num_train': 16,
                                     'train.global_batch_size': 2})
  it = make_train_iterator(c, seed=0, num_workers=2)
  next(it)
  print('ready', os.getpid(), flush=True)
  time.sleep(600)


if __name__ == '__main__':
  sys.exit(main())
