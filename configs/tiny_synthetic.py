"""Smoke run: the tiny model trained from scratch on the synthetic shapes.

The README's first command.  ``tiny.py``'s sizes (the golden fixture's),
with the classes of the synthetic data (8 shapes) and a short schedule that
finishes on a laptop CPU in minutes, then evaluates COCO box AP on the
held-out synthetic split.
"""
import os

import ml_collections

from ddq_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
  c = load_config('tiny', config_dir=os.path.dirname(__file__))
  c.name = 'tiny_synthetic'
  c.data.source = 'synthetic'
  c.num_classes = c.data.synthetic_num_classes
  c.class_names = ('circle', 'square', 'triangle', 'cross', 'ring', 'diamond',
                   'hbar', 'star')[:c.num_classes]
  # Measured (2-core CPU): AP 0.005 / 0.046 / 0.124 / 0.192 (AP50 0.39)
  # after 100 / 200 / 300 / 400 steps; fresh runs end at AP 0.16 to 0.19
  # (AP50 0.30 to 0.39), see benchmarks/RESULTS.md.
  c.train.max_steps = 400
  c.train.eval_every = 200        # and once more at the end
  c.train.checkpoint_every = 100
  c.optim.lr = 1e-3               # 5x the COCO recipe: a short schedule
  c.optim.warmup_steps = 20
  # From scratch (no torchvision weights): the reference's frozen stem,
  # frozen BatchNorm affine and zero-initialised residual norms would leave
  # most of the ResNet dead, so train every stage and the norm affines.
  c.backbone.frozen_stages = -1
  c.backbone.zero_init_residual = False
  c.backbone.bn_trainable = True
  return c
