"""Evaluation batches: make_eval_iterator (test-time resize only, each
host its slice of every batch, canvases from ``data.eval_canvas``; the
batch contract is documented in ddq_jax.data)."""
from __future__ import annotations

import math

import numpy as np

from ddq_jax.data import transforms as T
from ddq_jax.data.base import DetectionSource, log
from ddq_jax.data.batching import (collate, eval_canvases, fits_any,
                                   select_canvas)
from ddq_jax.data.pipeline import (BatchIterator, best_canvas, blank_sample,
                                   build_dataset)

class EvalBatchFn:
  """Eval batch number -> this host's batch (test-time resize only)."""

  def __init__(self, source: DetectionSource, data_cfg, *, batch_size: int,
               max_gt: int, process_index: int, process_count: int):
    self.source, self.b = source, int(batch_size)
    self.p, self.pc, self.max_gt = process_index, process_count, max_gt
    self.scale = tuple(data_cfg.test_scale)
    self.exact = data_cfg['eval_canvas'] == 'exact'
    self.divisor = max(1, int(data_cfg['pad_size_divisor']))
    self.canvases = eval_canvases(data_cfg)
    self.mean, self.std = tuple(data_cfg.mean), tuple(data_cfg.std)
    n = len(source)
    self.sizes = source.sizes
    self.gb = self.b * process_count
    if self.sizes is not None:
      # Images grouped by the canvas each needs alone (in canvas order),
      # each group padded (-1) to whole global batches: no batch is padded
      # to a larger canvas because of a neighbour.
      self.shapes = [T.rescale_size(size_hw=s, scale=self.scale)[0]
                     for s in self.sizes]
      own = np.asarray([self.canvases.index(select_canvas(
          [s], canvas_sizes=self.canvases)) if fits_any(s, self.canvases)
                        else len(self.canvases) for s in self.shapes])
      groups = [np.nonzero(own == c)[0]
                for c in range(len(self.canvases) + 1)]
      self.order = np.concatenate(
          [np.pad(g, (0, -len(g) % self.gb), constant_values=-1)
           for g in groups]).astype(np.int64)
    else:
      self.order = np.arange(n)
    self.num_batches = math.ceil(len(self.order) / self.gb)

  def __call__(self, k: int) -> dict:
    g = self.order[k * self.gb:(k + 1) * self.gb]
    local = list(g[self.p * self.b:(self.p + 1) * self.b])
    local += [-1] * (self.b - len(local))
    samples, lost = [], {}  # lost: slot -> image id of an unreadable image
    for idx in local:
      s = None
      if idx >= 0:
        r = self.source.load(int(idx))
        if r['image'] is not None:
          s = T.apply_test_transform(r['image'], r['boxes'], r['labels'],
                                     scale=self.scale)
          s.update(image_id=r['image_id'], orig_size=r['orig_size'])
        else:
          lost[len(samples)] = int(r['image_id'])
      samples.append(s)
    shapes = [s['image'].shape[:2] for s in samples if s is not None]
    canvas = None
    if self.exact and (self.pc == 1 or self.sizes is not None):
      # pad only to the batch's largest image (the reference's way)
      if self.pc > 1:  # hosts agree through the metadata
        shapes = [self.shapes[i] for i in g if i >= 0]
      d = self.divisor
      hm = max([int(h) for h, _ in shapes] or [1])
      wm = max([int(w) for _, w in shapes] or [1])
      canvas = (-(-hm // d) * d, -(-wm // d) * d)
    elif self.pc == 1:  # one host: the decoded shapes decide
      try:
        canvas = select_canvas(shapes or [(1, 1)], canvas_sizes=self.canvases)
      except ValueError:
        canvas = None
    if canvas is None and self.sizes is not None:
      canvas = select_canvas([self.shapes[i] for i in g if i >= 0],
                             canvas_sizes=self.canvases)
    elif canvas is None:
      canvas = max(self.canvases, key=lambda c: (c[0] * c[1], c))
    for i, s in enumerate(samples):
      if s is not None and (s['image'].shape[0] > canvas[0]
                            or s['image'].shape[1] > canvas[1]):
        log.warning('image %s: decoded size %s differs from its metadata and '
                    'fits no agreed canvas; skipped', s['image_id'],
                    s['orig_size'])
        lost[i] = int(s['image_id'])
        samples[i] = None
    valid = [s is not None for s in samples]
    samples = [s if s is not None else blank_sample(canvas, self.mean)
               for s in samples]
    out = collate(samples, canvas=canvas, max_gt=self.max_gt,
                  mean=self.mean, std=self.std, valid=valid,
                  normalized=False)
    for i, image_id in lost.items():  # sample_valid False, id kept
      out['image_ids'][i] = image_id
    return out


class EvalIterator(BatchIterator):
  """Finite iterator over the whole split; ``len()`` = number of batches;
  ``source`` is the DetectionSource (category_ids, coco_gt())."""

  def __len__(self) -> int:
    return self.stop


def make_eval_iterator(config, *, batch_size: int, split: str | None = None,
                       process_index: int = 0, process_count: int = 1,
                       dataset: DetectionSource | None = None,
                       num_workers: int | None = None) -> EvalIterator:
  """Iterator over the whole eval split in static batches.

  Args:
    batch_size: per-host batch size B.
    split: default config.data.eval_split.
    process_index, process_count: hosts; every host yields the same number
      of batches (about ceil(N / (B * process_count)), one more when
      landscape and portrait images are batched apart).
    dataset: an already built source (default: build_dataset).
  Returns:
    EvalIterator of batch-contract dicts whose images are the uint8
    canvases (zeros outside each image) that the inference program
    ``serve.detect`` takes; samples past the end of the split
    have sample_valid False and image_ids -1, unreadable images (dropped)
    sample_valid False and their image id.
    Samples are ordered landscape-first when sizes are known.
    With data.eval_canvas == 'exact' the canvas is the batch's largest image
    rounded up to data.pad_size_divisor (not a static canvas): with
    batch_size 1 that is the reference's padding exactly (none), at the
    cost of one compile per distinct shape.
  """
  src = dataset if dataset is not None else build_dataset(
      config, split or config.data.eval_split)
  fn = EvalBatchFn(src, config.data, batch_size=batch_size,
                   max_gt=config.loss.max_gt, process_index=process_index,
                   process_count=process_count)
  nw = config.data.num_workers if num_workers is None else num_workers
  return EvalIterator(fn, start=0, stop=fn.num_batches, num_workers=nw)
