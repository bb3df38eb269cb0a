"""The Swin golden fixture's sizes (tests/data/tiny_swin): the tiny
DDQ-DETR (64-d transformer, 2 encoder / 3 decoder layers, 30 distinct
queries) on a toy Swin backbone: embed 32, depths 1-1-2-1, heads 1-2-4-8,
window 4, outputs of stages 1, 2, 3 (64 / 128 / 256 channels), no drop-path.
"""
import os

import ml_collections

from ddq_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
  here = os.path.dirname(__file__)
  c = load_config('tiny', config_dir=here)
  swin = load_config('ddq_swinl_4scale', config_dir=here)
  c.name = 'tiny_swin'
  c.backbone = swin.backbone
  c.backbone.embed_dims = 32
  c.backbone.depths = (1, 1, 2, 1)
  c.backbone.num_heads = (1, 2, 4, 8)
  c.backbone.window_size = 4
  c.backbone.drop_path_rate = 0.0
  c.backbone.pretrain_img_size = 64
  c.optim.backbone_lr_mult = swin.optim.backbone_lr_mult
  return c
