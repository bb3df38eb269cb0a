"""Padding samples into the static batch contract (see ddq_jax.data)."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ddq_jax.data.transforms import normalize

log = logging.getLogger('ddq_jax.data')
_truncated = [0]


def select_canvas(shapes: Sequence[Sequence[int]], *,
                  canvas_sizes: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The smallest (by area, then listed order) canvas that fits every shape.

  Args:
    shapes: (h, w) of each image in the (global) batch.
    canvas_sizes: the static (H, W) set from config.data.canvas_sizes.
  Raises:
    ValueError if no canvas fits (the config's canvases are too small).
  """
  hmax = max((int(s[0]) for s in shapes), default=0)
  wmax = max((int(s[1]) for s in shapes), default=0)
  fits = [(int(h) * int(w), i, (int(h), int(w)))
          for i, (h, w) in enumerate(canvas_sizes) if h >= hmax and w >= wmax]
  if not fits:
    raise ValueError(f'no canvas in {list(canvas_sizes)} fits images up to '
                     f'(h={hmax}, w={wmax}); add a larger data.canvas_sizes '
                     'entry')
  return min(fits)[2]


def fits_any(shape: Sequence[int], canvases: Sequence[Sequence[int]]) -> bool:
  """Whether some canvas holds an (h, w) image."""
  return any(int(h) >= int(shape[0]) and int(w) >= int(shape[1])
             for h, w in canvases)


def eval_canvases(data_cfg) -> list[tuple[int, int]]:
  """The evaluation canvases: ``data.eval_canvas_sizes`` when set, else the
  training ``data.canvas_sizes``."""
  sizes = (data_cfg.eval_canvas_sizes if 'eval_canvas_sizes' in data_cfg
           else None) or data_cfg.canvas_sizes
  return [(int(h), int(w)) for h, w in sizes]


def padding_overhead(shapes: Sequence[Sequence[int]], *,
                     canvas_sizes: Sequence[Sequence[int]],
                     weights: Sequence[float] | None = None) -> float:
  """Canvas area over image area, summed over images (each on the smallest
  canvas that holds it alone, as batches grouped by canvas get): the
  compute spent per useful pixel.  ``weights``: optional frequency of each
  shape.  Raises ValueError when a shape fits no canvas."""
  w = np.ones(len(shapes)) if weights is None else np.asarray(weights, float)
  canvas_area = image_area = 0.0
  for (h, wd), f in zip(shapes, w):
    ch, cw = select_canvas([(h, wd)], canvas_sizes=canvas_sizes)
    canvas_area += f * ch * cw
    image_area += f * int(h) * int(wd)
  return canvas_area / image_area


def collate(samples: Sequence[dict], *, canvas: Sequence[int], max_gt: int,
            mean: Sequence[float], std: Sequence[float],
            valid: Sequence[bool] | None = None,
            normalized: bool = True) -> dict:
  """Pads transformed samples into one batch.

  Args:
    samples: B dicts with image (h, w, 3) uint8 RGB, boxes (n, 4) float32
      xyxy, labels (n,), img_shape (h, w), scale_factor (sx, sy),
      orig_size (h0, w0), image_id.
    canvas: (H, W) static canvas, >= every image.
    max_gt: G; boxes beyond G are cut (first G kept, counted warning).
    valid: (B,) sample_valid, default all True.
    normalized: images (x - mean) / std in float32 (training); False: the
      uint8 pixels, zeros outside each image (evaluation: the inference
      program ``serve.detect`` normalises).
  Returns:
    the batch contract dict: images (B, H, W, 3) float32 (uint8 when not
    ``normalized``), pad_mask (B, H, W)
    bool, img_shapes (B, 2) int32, scale_factors (B, 2) float32,
    orig_sizes (B, 2) int32, gt_boxes (B, G, 4) float32, gt_labels (B, G)
    int32, gt_valid (B, G) bool, image_ids (B,) int64, sample_valid (B,) bool.
  """
  b = len(samples)
  hc, wc = int(canvas[0]), int(canvas[1])
  out = dict(
      images=np.zeros((b, hc, wc, 3), np.float32 if normalized else np.uint8),
      pad_mask=np.ones((b, hc, wc), bool),
      img_shapes=np.zeros((b, 2), np.int32),
      scale_factors=np.ones((b, 2), np.float32),
      orig_sizes=np.zeros((b, 2), np.int32),
      gt_boxes=np.zeros((b, max_gt, 4), np.float32),
      gt_labels=np.zeros((b, max_gt), np.int32),
      gt_valid=np.zeros((b, max_gt), bool),
      image_ids=np.full((b,), -1, np.int64),
      sample_valid=np.asarray(valid if valid is not None else [True] * b,
                              bool))
  for i, s in enumerate(samples):
    img = s['image']
    h, w = img.shape[:2]
    if h > hc or w > wc:
      raise ValueError(f'image ({h}, {w}) does not fit canvas ({hc}, {wc})')
    out['images'][i, :h, :w] = (normalize(img, mean=mean, std=std)
                                if normalized else img)
    out['pad_mask'][i, :h, :w] = False
    out['img_shapes'][i] = (h, w)
    out['scale_factors'][i] = s['scale_factor']
    out['orig_sizes'][i] = s['orig_size']
    if out['sample_valid'][i]:
      out['image_ids'][i] = s['image_id']
    boxes = np.asarray(s['boxes'], np.float32).reshape(-1, 4)
    labels = np.asarray(s['labels']).reshape(-1)
    n = len(boxes)
    if n > max_gt:
      _truncated[0] += 1
      log.warning('image %s has %d boxes > max_gt=%d: keeping the first %d '
                  '(%d images truncated so far in this process)',
                  s.get('image_id'), n, max_gt, max_gt, _truncated[0])
      n = max_gt
    out['gt_boxes'][i, :n] = boxes[:n]
    out['gt_labels'][i, :n] = labels[:n]
    out['gt_valid'][i, :n] = True
  return out
