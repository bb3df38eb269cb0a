"""DDQ-DETR, ResNet-50, 5 feature levels, 12 epochs on COCO.

The reference's ``configs/ddq/ddq-detr-5scale_r50_8xb2-12e_coco.py``:
backbone outputs all four stages and the ChannelMapper adds a fifth level.
"""
import os

import ml_collections

from ddq_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
  c = load_config('ddq_r50_4scale', config_dir=os.path.dirname(__file__))
  c.name = 'ddq_r50_5scale'
  c.num_levels = 5
  c.backbone.out_indices = (0, 1, 2, 3)
  return c
