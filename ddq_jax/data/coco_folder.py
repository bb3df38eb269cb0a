"""Any COCO-format folder: an images directory + an instances JSON.

Parsed without pycocotools and validated at start-up:
  * a JSON that is not COCO instances -> ValueError naming the file and
    what is missing;
  * an annotation with an unknown category / image id -> counted skip;
  * crowd boxes, ``ignore`` boxes, boxes without overlap with the image,
    area <= 0, w < 1 or h < 1 -> dropped (counted); boxes are clipped;
  * images without annotations are kept;
  * image files missing at start-up -> dropped (counted warning); files that
    fail to decode later -> ``load`` returns image None (the loader skips it
    with a counted warning, never crashes).
Labels are contiguous indices into the categories sorted by id.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ddq_jax.data.base import DetectionSource, log, sanitize_xywh
from ddq_jax.data.transforms import read_image


def _require(cond: bool, path: str, what: str) -> None:
  if not cond:
    raise ValueError(f'{path}: not a COCO instances file: {what}')


def parse_coco_json(path: str) -> dict:
  """Reads and validates a COCO instances JSON.

  Returns:
    the parsed dict.
  Raises:
    FileNotFoundError if absent; ValueError if not JSON or not COCO.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'COCO annotation file not found: {path}')
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  _require(isinstance(data, dict), path, 'top level is not an object')
  for key in ('images', 'annotations', 'categories'):
    _require(key in data, path, f'missing top-level key {key!r}')
    _require(isinstance(data[key], list), path, f'{key!r} is not a list')
  _require(len(data['categories']) > 0, path, "'categories' is empty")
  for i, c in enumerate(data['categories']):
    _require(isinstance(c, dict) and 'id' in c, path,
             f"categories[{i}] has no 'id'")
  for i, im in enumerate(data['images']):
    for key in ('id', 'file_name'):
      _require(isinstance(im, dict) and key in im, path,
               f'images[{i}] has no {key!r}')
  for i, a in enumerate(data['annotations']):
    for key in ('image_id', 'category_id', 'bbox'):
      _require(isinstance(a, dict) and key in a, path,
               f'annotations[{i}] has no {key!r}')
  return data


class CocoFolderSource(DetectionSource):
  """A COCO-format folder.

  Args:
    image_dir: directory holding the ``file_name``s of the JSON.
    ann_file: the instances JSON.
    min_size: drop images whose metadata min(h, w) < min_size (mmdet's
      filter_cfg min_size for training; 0 keeps all).
    check_files: drop images whose file is missing at start-up.
  """

  def __init__(self, *, image_dir: str, ann_file: str, min_size: int = 0,
               check_files: bool = True):
    super().__init__()
    data = parse_coco_json(ann_file)
    self.ann_file, self.image_dir = ann_file, image_dir
    cats = sorted(data['categories'], key=lambda c: c['id'])
    self.category_ids = [int(c['id']) for c in cats]
    self.class_names = [str(c.get('name', c['id'])) for c in cats]
    cat2label = {c: i for i, c in enumerate(self.category_ids)}
    stats = dict(unknown_category=0, unknown_image=0, crowd=0,
                 invalid_box=0, missing_file=0, small_image=0,
                 no_size=0)
    images = {}
    for im in data['images']:
      images[im['id']] = im
    per_image: dict = {k: ([], []) for k in images}
    for a in data['annotations']:
      im = images.get(a['image_id'])
      if im is None:
        stats['unknown_image'] += 1
        continue
      if a['category_id'] not in cat2label:
        stats['unknown_category'] += 1
        continue
      if a.get('iscrowd', 0) or a.get('ignore', False):
        stats['crowd'] += 1
        continue
      h, w = im.get('height'), im.get('width')
      if h is None or w is None:
        h = w = np.inf  # size unknown: clip at load time instead
      box = sanitize_xywh(a['bbox'], height=h, width=w, area=a.get('area'))
      if box is None:
        stats['invalid_box'] += 1
        continue
      per_image[a['image_id']][0].append(box)
      per_image[a['image_id']][1].append(cat2label[a['category_id']])
    ids, sizes, files, boxes, labels = [], [], [], [], []
    for img_id, im in images.items():
      h, w = im.get('height'), im.get('width')
      if h is None or w is None:
        stats['no_size'] += 1
        h = w = -1
      elif min(h, w) < min_size:
        stats['small_image'] += 1
        continue
      path = os.path.join(image_dir, im['file_name'])
      if check_files and not os.path.isfile(path):
        stats['missing_file'] += 1
        continue
      ids.append(img_id)
      sizes.append((h, w))
      files.append(path)
      b, l = per_image[img_id]
      boxes.append(np.asarray(b, np.float32).reshape(-1, 4))
      labels.append(np.asarray(l, np.int32))
    self.image_ids = np.asarray(ids, np.int64)
    self.sizes = (None if stats['no_size'] else
                  np.asarray(sizes, np.int32).reshape(-1, 2))
    self.files, self._boxes, self._labels = files, boxes, labels
    self.stats.update(stats)
    self._kept_ids = set(ids)
    if stats['missing_file']:
      log.warning('%s: %d image files missing under %s (dropped)', ann_file,
                  stats['missing_file'], image_dir)
    dropped = {k: v for k, v in stats.items() if v and k != 'missing_file'}
    if dropped:
      log.warning('%s: skipped at start-up: %s', ann_file, dropped)

  def load(self, index: int) -> dict:
    image = read_image(self.files[index])
    boxes, labels = self._boxes[index], self._labels[index]
    if image is None:
      self.count_unreadable(self.files[index])
      size = (tuple(int(v) for v in self.sizes[index])
              if self.sizes is not None else (0, 0))
    else:
      size = image.shape[:2]
      boxes = boxes.copy()
      boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, size[1])
      boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, size[0])
      keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
      boxes, labels = boxes[keep], labels[keep]
    return dict(image=image, boxes=boxes, labels=labels,
                image_id=int(self.image_ids[index]),
                orig_size=tuple(int(v) for v in size))

  def coco_gt(self) -> dict:
    """The JSON restricted to the images this source kept."""
    raw = parse_coco_json(self.ann_file)
    d = dict(raw)
    d['images'] = [im for im in raw['images'] if im['id'] in self._kept_ids]
    cats = set(self.category_ids)
    d['annotations'] = [a for a in raw['annotations']
                        if a['image_id'] in self._kept_ids
                        and a.get('category_id') in cats]
    return d
