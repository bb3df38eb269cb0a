"""The golden fixture's sizes (tests/data/tiny): a toy DDQ-DETR for
tests and smoke runs.  Same architecture as R50 4-scale with smaller sizes:
ResNet-50 layout at base width 16, 64-d transformer, 2 encoder / 3 decoder
layers, 30 distinct queries (45 dense), 20 denoising queries.
"""
import os

import ml_collections

from ddq_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
  c = load_config('ddq_r50_4scale', config_dir=os.path.dirname(__file__))
  c.name = 'tiny'
  c.embed_dims = 64
  c.num_encoder_layers = 2
  c.num_decoder_layers = 3
  c.ffn_dims = 128
  c.num_queries = 30
  c.nms_pre_topk = 400
  c.max_per_img = 50
  c.backbone.base_channels = 16
  c.dn.num_dn_queries = 20
  c.loss.max_gt = 16

  c.data.test_scale = (160, 128)
  c.data.train_scales = ((96, 160), (112, 160), (128, 160))
  c.data.crop_scales = ((96, 200), (112, 200), (128, 200))
  c.data.crop_size = (64, 96)
  c.data.canvas_sizes = ((128, 128), (128, 160), (160, 128))
  c.data.eval_canvas_sizes = ()  # evaluation uses canvas_sizes
  c.data.num_workers = 2
  c.data.synthetic_size = 128
  c.data.synthetic_num_train = 512
  c.data.synthetic_num_eval = 64

  c.optim.warmup_steps = 50
  c.train.global_batch_size = 8
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  # Small enough to run unrolled without remat: the fastest plan that fits.
  c.train.memory = 'auto'
  c.eval.batch_size = 8
  return c
