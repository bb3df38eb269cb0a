"""mmdetection 3.3.0's DDQ-DETR, timed as ``python -m ddq_jax benchmark``
times ours, for side-by-side runs on one machine.

Not part of the test suite: it needs torch, mmcv 2.1.0 (built with its
ops) and mmdet 3.3.0.  Random weights (``init_weights()``), random images,
8 random ground-truth boxes per image (train).  ``infer`` times
``model.predict`` under ``torch.no_grad()``; ``train`` times ``model.loss``
plus ``backward()`` (no optimiser step: ours includes the AdamW update, so
the comparison favours the reference slightly).  One warm-up call, then
``--steps`` timed calls; one JSON line, with the fields our benchmark
prints where they mean the same.

    python benchmarks/reference_speed.py tests/data/tiny/mmdet_config.py \\
        --mode train --batch 2 --size 128 128
    python -m ddq_jax benchmark --config tiny --mode train --batch 2 \\
        --size 128 128

Run the two alternately, with the same thread count, and compare medians.
"""
import argparse
import json
import os
import resource
import time

import numpy as np
import torch
from mmengine.config import Config
from mmengine.structures import InstanceData
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules


def _samples(batch, size, num_classes, rng):
  h, w = size
  out = []
  for _ in range(batch):
    s = DetDataSample(metainfo=dict(
        img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
        batch_input_shape=(h, w), scale_factor=(1.0, 1.0)))
    xy = rng.uniform(0, 0.6, (8, 2)) * (w, h)
    wh = rng.uniform(0.1, 0.4, (8, 2)) * (w, h)
    boxes = np.concatenate([xy, np.minimum(xy + wh, (w, h))], -1)
    gt = InstanceData()
    gt.bboxes = torch.tensor(boxes, dtype=torch.float32)
    gt.labels = torch.tensor(rng.integers(0, num_classes, 8))
    s.gt_instances = gt
    out.append(s)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('config', help="an mmdetection config file (e.g. the tiny "
                 "fixture's tests/data/tiny/mmdet_config.py)")
  p.add_argument('--mode', choices=('infer', 'train'), default='infer')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--size', type=int, nargs=2, default=(800, 1333),
                 metavar=('H', 'W'))
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--threads', type=int, default=os.cpu_count(),
                 help='torch.set_num_threads (default: every CPU)')
  a = p.parse_args(argv)
  torch.set_num_threads(a.threads)
  register_all_modules()
  cfg = Config.fromfile(a.config)
  # Random weights, as ours: no pretrained backbone to fetch (the published
  # configs name torchvision's or a URL's).
  cfg.model.backbone.init_cfg = None
  t0 = time.perf_counter()
  model = MODELS.build(cfg.model)
  model.init_weights()
  init_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  images = torch.tensor(rng.standard_normal(
      (a.batch, 3) + tuple(a.size)).astype(np.float32))
  samples = _samples(a.batch, a.size, cfg.model.bbox_head.num_classes, rng)

  def step():
    if a.mode == 'infer':
      model.eval()
      with torch.no_grad():
        return model.predict(images, samples)
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model.loss(images, samples)
    total, _ = model.parse_losses(losses)
    total.backward()
    return total

  t0 = time.perf_counter()
  step()
  warmup_s = time.perf_counter() - t0
  times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  print(json.dumps(dict(
      impl='mmdet-3.3.0', config=os.path.basename(a.config), mode=a.mode,
      batch=a.batch, size=list(a.size), threads=a.threads,
      init_s=round(init_s, 2), warmup_s=round(warmup_s, 2),
      steps=a.steps, step_median_s=round(median, 4),
      step_min_s=round(min(times), 4),
      step_times_s=[round(t, 4) for t in times],
      images_per_s=round(a.batch / median, 3),
      peak_host_rss_gb=round(resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
      load_avg_1m=round(os.getloadavg()[0], 2), torch=torch.__version__)))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
