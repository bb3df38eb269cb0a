#!/usr/bin/env python
"""Train DDQ-DETR: ``python train.py --help`` (the same as ``python -m
ddq_jax train``; the command lives in ``ddq_jax/train/cli.py``)."""
import os
import sys

if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from ddq_jax.train.cli import main  # pylint: disable=g-import-not-at-top
  sys.exit(main())
