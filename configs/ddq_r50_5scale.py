"""DDQ-DETR, ResNet-50, 5 feature levels, 12 epochs on COCO.

The reference's ``configs/ddq/ddq-detr-5scale_r50_8xb2-12e_coco.py``:
backbone outputs all four stages and the ChannelMapper adds a fifth level.
"""
import importlib.util
import os

import ml_collections


def _base():
  path = os.path.join(os.path.dirname(__file__), 'ddq_r50_4scale.py')
  spec = importlib.util.spec_from_file_location('ddq_r50_4scale', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  c = _base()
  c.name = 'ddq_r50_5scale'
  c.num_levels = 5
  c.backbone.out_indices = (0, 1, 2, 3)
  return c
