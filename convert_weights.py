#!/usr/bin/env python
"""Import mmdetection DDQ-DETR (or torchvision ResNet) .pth weights.

See ``python convert_weights.py --help``; the logic lives in
``ddq_jax/io/conversion/``.
"""
import sys

from ddq_jax.io.conversion.cli import main

if __name__ == '__main__':
  sys.exit(main())
