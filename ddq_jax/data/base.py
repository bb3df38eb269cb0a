"""The interface every data source implements, and shared helpers.

A source is a random-access list of images with their annotations:

  len(source)                    number of images
  source.load(i) -> dict         image (h, w, 3) uint8 RGB or None when the
                                 file is missing/corrupt; boxes (n, 4) float32
                                 xyxy pixels of the original image (clipped,
                                 no zero-area, no crowd); labels (n,) int32
                                 contiguous 0..K-1; image_id int;
                                 orig_size (h, w) (from the decoded image, or
                                 metadata if the image is None).
  source.image_ids               (N,) int64, the dataset's ids
  source.sizes                   (N, 2) int32 (h, w) from metadata, or None
                                 when unknown without decoding (TFDS)
  source.category_ids            list: contiguous label -> dataset category id
  source.class_names             list of K names
  source.coco_gt()               COCO-format ground-truth dict (for metrics)
  source.ann_file                path of the instances JSON, or None
  source.stats                   dict of counted start-up skips / warnings
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger('ddq_jax.data')


class DetectionSource:
  """Base class; subclasses fill the attributes and implement ``load``."""

  image_ids: np.ndarray
  sizes: np.ndarray | None = None
  category_ids: list
  class_names: list
  ann_file: str | None = None

  def __init__(self):
    self.stats: dict[str, int] = {}
    self._unreadable = 0

  def __len__(self) -> int:
    return len(self.image_ids)

  def load(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def coco_gt(self) -> dict:
    raise NotImplementedError

  def count_unreadable(self, what: str) -> None:
    """Logs a counted warning for an image that could not be read."""
    self._unreadable += 1
    self.stats['unreadable_images'] = self._unreadable
    log.warning('skipping unreadable image %s (%d so far in this process)',
                what, self._unreadable)


def sanitize_xywh(bbox, *, height: int, width: int, area=None
                  ) -> np.ndarray | None:
  """COCO [x, y, w, h] -> clipped xyxy float32, or None to drop.

  Drops like mmdet's CocoDataset.parse_data_info: no overlap with the image,
  area <= 0, w < 1 or h < 1; then clips to the image (mmdet's Resize clips
  later, which is equivalent).
  """
  try:
    x, y, w, h = (float(v) for v in bbox)
  except (TypeError, ValueError):
    return None
  if not all(np.isfinite([x, y, w, h])):
    return None
  inter_w = max(0.0, min(x + w, width) - max(x, 0.0))
  inter_h = max(0.0, min(y + h, height) - max(y, 0.0))
  if inter_w * inter_h == 0:
    return None
  if area is None:
    area = w * h
  if area <= 0 or w < 1 or h < 1:
    return None
  box = np.asarray([x, y, x + w, y + h], np.float32)
  box[0::2] = np.clip(box[0::2], 0, width)
  box[1::2] = np.clip(box[1::2], 0, height)
  return box


def coco_gt_from_arrays(*, image_ids, sizes, boxes, labels, category_ids,
                        class_names, file_names=None) -> dict:
  """Builds a COCO-format ground-truth dict.

  Args:
    image_ids: (N,) ints; sizes: (N, 2) (h, w); boxes: list of (n_i, 4)
    xyxy arrays; labels: list of (n_i,) contiguous labels.
  """
  images, anns = [], []
  for i, img_id in enumerate(image_ids):
    h, w = int(sizes[i][0]), int(sizes[i][1])
    images.append(dict(id=int(img_id), height=h, width=w,
                       file_name=(file_names[i] if file_names else
                                  f'{int(img_id):012d}.png')))
    for b, l in zip(np.asarray(boxes[i]).reshape(-1, 4),
                    np.asarray(labels[i]).reshape(-1)):
      x1, y1, x2, y2 = (float(v) for v in b)
      anns.append(dict(id=len(anns) + 1, image_id=int(img_id),
                       category_id=int(category_ids[int(l)]),
                       bbox=[x1, y1, x2 - x1, y2 - y1],
                       area=(x2 - x1) * (y2 - y1), iscrowd=0))
  cats = [dict(id=int(c), name=str(n), supercategory='none')
          for c, n in zip(category_ids, class_names)]
  return dict(images=images, annotations=anns, categories=cats)
