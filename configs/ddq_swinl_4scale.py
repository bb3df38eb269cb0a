"""DDQ-DETR, Swin-L backbone, 4 feature levels, 30 epochs on COCO.

The reference's ``configs/ddq/ddq-detr-4scale_swinl_8xb2-30e_coco.py``
(mmdetection 3.3.0): 58.7 box AP on COCO val2017 for its published weights.
The transformer, head, losses and data pipeline are those of the R50 4-scale
setting; the backbone is mmdet's SwinTransformer (embed 192, depths
2-2-18-2, heads 6-12-24-48, window 12, drop-path 0.2, outputs of stages
1, 2, 3: 384 / 768 / 1536 channels), initialised from the ImageNet-22k
classification checkpoint ``swin_large_patch4_window12_384_22k.pth``
(``--config.train.init_from=...pth``, official Swin key layout).  The
schedule: backbone lr x0.05, 30 epochs, lr x0.1 at epochs 20 and 26.
"""
import os

import ml_collections

from ddq_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
  c = load_config('ddq_r50_4scale', config_dir=os.path.dirname(__file__))
  c.name = 'ddq_swinl_4scale'

  c.backbone = ml_collections.ConfigDict()
  c.backbone.type = 'swin'
  c.backbone.embed_dims = 192
  c.backbone.depths = (2, 2, 18, 2)
  c.backbone.num_heads = (6, 12, 24, 48)
  c.backbone.window_size = 12
  c.backbone.mlp_ratio = 4.0
  c.backbone.patch_size = 4
  c.backbone.strides = (4, 2, 2, 2)
  c.backbone.out_indices = (1, 2, 3)
  c.backbone.qkv_bias = True
  c.backbone.qk_scale = 0.0          # the reference's None: head_dim ** -0.5
  c.backbone.patch_norm = True
  c.backbone.drop_rate = 0.0
  c.backbone.attn_drop_rate = 0.0
  c.backbone.drop_path_rate = 0.2
  c.backbone.use_abs_pos_embed = False
  c.backbone.frozen_stages = -1      # the reference's default: none frozen
  c.backbone.pretrain_img_size = 384
  c.backbone.with_cp = False         # True: re-materialise blocks (memory)
  # Memory / compile time only (values and gradients do not change):
  # re-materialise each trainable Swin block (each scanned pair) in the
  # backward pass, and scan each stage's (regular, shifted) block pairs
  # (stage 3: 9 pairs traced once).  benchmarks/RESULTS.md, "Swin-L".
  c.train.remat.backbone = 'full'
  c.train.scan_layers = True

  c.optim.backbone_lr_mult = 0.05
  # Per-parameter update: 15.14 GB per image at 800x1344 instead of 17.08
  # GB (the flat copies of 0.82 GB of parameters); 161k HLO lines instead
  # of 83k (benchmarks/RESULTS.md, "Swin-L").
  c.optim.flat_update = False
  c.optim.epochs = 30
  c.optim.decay_epochs = (20, 26)
  return c
