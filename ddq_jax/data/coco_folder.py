"""Any COCO-format folder: an images directory + an instances JSON.

Parsed without pycocotools and validated at start-up; each problem gets
one line naming the file, the field and the count, and either stops
(ValueError, before any work) or is fixed up as listed:
  * a JSON that is not COCO instances -> stop, naming what is missing;
  * ``images[].id`` / ``annotations[].image_id`` / ``categories[].id`` that
    are not integers -> stop; duplicate ``images[].id`` or
    ``categories[].id`` -> stop (which image a box belongs to is unknowable);
  * an annotation naming no image / no category -> skipped (counted);
  * crowd boxes, ``ignore`` boxes, boxes without overlap with the image,
    area <= 0, w < 1 or h < 1 -> dropped (counted); boxes are clipped;
  * images without annotations are kept;
  * ``images[].height`` / ``width`` missing -> read from the image file's
    header (data.image_size);
  * image files missing at start-up -> dropped (one warning; all missing ->
    stop); files that fail to decode later -> ``load`` returns image None
    (the loader skips it with a counted warning, never crashes);
  * categories vs the model's classes (``model_class_names``): the same
    number -> label = rank of the category id; fewer, all named like model
    classes -> each category maps to the model label of its name; fewer,
    other names -> by rank; both logged in one line (the model's other
    classes have no category and are ignored by the metrics); more ->
    stop (set num_classes / class_names to the folder's).
Labels are contiguous indices into the categories sorted by id (or into the
model's classes when mapped by name).
"""
from __future__ import annotations

import json
import os

import numpy as np

from ddq_jax.data.base import DetectionSource, log, sanitize_xywh
from ddq_jax.data.image_size import image_size
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
  _check_ids(path, 'images', 'id', [im['id'] for im in data['images']],
             unique=True)
  _check_ids(path, 'categories', 'id',
             [c['id'] for c in data['categories']], unique=True)
  _check_ids(path, 'annotations', 'image_id',
             [a['image_id'] for a in data['annotations']])
  _check_ids(path, 'annotations', 'category_id',
             [a['category_id'] for a in data['annotations']])
  return data


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_ids(path: str, table: str, field: str, values: list, *,
               unique: bool = False) -> None:
  """ValueError naming file, field and count for non-integer (or, with
  ``unique``, repeated) ids."""
  bad = [(i, v) for i, v in enumerate(values) if not _is_int(v)]
  if bad:
    i, v = bad[0]
    raise ValueError(
        f'{path}: {table}[].{field}: {len(bad)} of {len(values)} are not '
        f'integers (first: {table}[{i}].{field} = {v!r}); COCO ids are JSON '
        'integers: renumber them')
  if unique:
    seen, dups = {}, []
    for i, v in enumerate(values):
      if v in seen:
        dups.append((v, seen[v], i))
      else:
        seen[v] = i
    if dups:
      v, a, b = dups[0]
      raise ValueError(
          f'{path}: {table}[].{field}: {len(dups)} duplicate ids (first: {v} '
          f'at {table}[{a}] and {table}[{b}]); ids must be unique, so which '
          f'{table[:-1]} an annotation belongs to is ambiguous')


def map_categories(*, ann_file: str, class_names: list,
                   model_class_names=None) -> tuple[list | None, str]:
  """Dataset labels (categories sorted by id) -> model labels.

  Args:
    class_names: the dataset's category names, sorted by category id.
    model_class_names: the model's class names (None: no check).
  Returns:
    (mapping, message): mapping is None for the identity (label = rank of
    the category id), else a list (dataset label -> model label) when every
    category name is a model class; message is '' or the line to log.
  Raises:
    ValueError: more categories than the model has classes.
  """
  if model_class_names is None:
    return None, ''
  k_data, k_model = len(class_names), len(model_class_names)
  if k_data == k_model:
    return None, ''
  if k_data > k_model:
    raise ValueError(
        f'{ann_file}: categories: {k_data} categories for a {k_model}-class '
        f'model: {k_data - k_model} categories cannot be predicted; set '
        f'--config.num_classes={k_data} (and class_names) to train on this '
        'folder, or use a model with these classes')
  model = {str(n).strip().lower(): j
           for j, n in enumerate(model_class_names)}
  unknown = [n for n in class_names if str(n).strip().lower() not in model]
  if unknown:  # not the model's classes: by rank, said once
    return None, (
        f'{ann_file}: categories: {k_data} categories for a {k_model}-class '
        f'model and {len(unknown)} names are not model classes (first: '
        f'{unknown[0]!r}): category i (by id) is model label i; model labels '
        f'{k_data}..{k_model - 1} have no category (ignored by the metrics). '
        f'For a model of this folder set --config.num_classes={k_data}')
  mapping = [model[str(n).strip().lower()] for n in class_names]
  example = ', '.join(f'{n!r} -> {j}' for n, j in
                      list(zip(class_names, mapping))[:3])
  return mapping, (
      f'{ann_file}: categories: {k_data} categories for a {k_model}-class '
      f'model: mapped by name onto model labels ({example}); the other '
      f'{k_model - k_data} model classes have no category (ignored by the '
      'metrics)')


def _boxes_per_image(annotations: list, images: dict, cat2label: dict,
                     stats: dict) -> dict:
  """{image id: ([xyxy box], [label])} of the usable annotations; the
  others are counted in ``stats`` (unknown image or category, crowd,
  invalid box)."""
  per_image: dict = {k: ([], []) for k in images}
  for a in annotations:
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
      h = w = np.inf  # size unknown (file unreadable): clip at load time
    box = sanitize_xywh(a['bbox'], height=h, width=w, area=a.get('area'))
    if box is None:
      stats['invalid_box'] += 1
      continue
    per_image[a['image_id']][0].append(box)
    per_image[a['image_id']][1].append(cat2label[a['category_id']])
  return per_image


def _log_start_up(ann_file: str, image_dir: str, stats: dict, *,
                  num_images: int, missing: list) -> None:
  """One warning per kind of thing skipped at start-up."""
  if stats['missing_file']:
    log.warning('%s: images[].file_name: %d of %d image files missing under '
                '%s (first: %r); those images are dropped', ann_file,
                stats['missing_file'], num_images, image_dir, missing[0])
  if stats['unknown_image']:
    log.warning('%s: annotations[].image_id: %d annotations name no image '
                'of images[] (skipped)', ann_file, stats['unknown_image'])
  if stats['unknown_category']:
    log.warning('%s: annotations[].category_id: %d annotations name no '
                'category of categories[] (skipped)', ann_file,
                stats['unknown_category'])
  dropped = {k: v for k, v in stats.items() if v and k not in (
      'missing_file', 'unknown_image', 'unknown_category', 'sizes_read')}
  if dropped:
    log.warning('%s: skipped at start-up: %s', ann_file, dropped)


class CocoFolderSource(DetectionSource):
  """A COCO-format folder.

  Args:
    image_dir: directory holding the ``file_name``s of the JSON.
    ann_file: the instances JSON.
    min_size: drop images whose metadata min(h, w) < min_size (mmdet's
      filter_cfg min_size for training; 0 keeps all).
    check_files: drop images whose file is missing at start-up.
    model_class_names: the model's classes: check / map the categories
      (``map_categories``); None skips the check.
  """

  def __init__(self, *, image_dir: str, ann_file: str, min_size: int = 0,
               check_files: bool = True, model_class_names=None):
    super().__init__()
    data = parse_coco_json(ann_file)
    self.ann_file, self.image_dir = ann_file, image_dir
    cat2label = self._set_categories(data['categories'], model_class_names)
    stats = dict(unknown_category=0, unknown_image=0, crowd=0,
                 invalid_box=0, missing_file=0, small_image=0,
                 no_size=0)
    images = {}
    for im in data['images']:
      images[im['id']] = im
    self._read_missing_sizes(images, image_dir, stats, ann_file)
    per_image = _boxes_per_image(data['annotations'], images, cat2label,
                                 stats)
    ids, sizes, files, boxes, labels, missing = [], [], [], [], [], []
    for img_id, im in images.items():
      path = os.path.join(image_dir, im['file_name'])
      if check_files and not os.path.isfile(path):
        stats['missing_file'] += 1
        missing.append(im['file_name'])
        continue
      h, w = im.get('height'), im.get('width')
      if h is None or w is None:
        stats['no_size'] += 1
        h = w = -1
      elif min(h, w) < min_size:
        stats['small_image'] += 1
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
    self.missing_files = missing  # file_names dropped at start-up
    self.stats.update(stats)
    self._kept_ids = set(ids)
    if stats['missing_file'] and not ids:
      raise ValueError(
          f'{ann_file}: images[].file_name: all {stats["missing_file"]} '
          f'image files are missing under {image_dir} (first: '
          f'{missing[0]!r}); is data.coco_dir / the image directory right?')
    _log_start_up(ann_file, image_dir, stats, num_images=len(images),
                  missing=missing)

  def _set_categories(self, categories: list, model_class_names) -> dict:
    """``category_ids`` and ``class_names`` (the model's classes when
    given, ``map_categories``); returns {category id: label}."""
    cats = sorted(categories, key=lambda c: c['id'])
    data_ids = [int(c['id']) for c in cats]
    data_names = [str(c.get('name', c['id'])) for c in cats]
    mapping, message = map_categories(ann_file=self.ann_file,
                                      class_names=data_names,
                                      model_class_names=model_class_names)
    if message:
      log.warning('%s', message)
    if mapping is None:
      self.category_ids, self.class_names = data_ids, data_names
      return {c: i for i, c in enumerate(data_ids)}
    # model label -> category id; -1: a class with no category
    self.category_ids = [-1] * len(model_class_names)
    self.class_names = [str(n) for n in model_class_names]
    for c, j in zip(data_ids, mapping):
      self.category_ids[j] = c
    return dict(zip(data_ids, mapping))

  @staticmethod
  def _read_missing_sizes(images: dict, image_dir: str, stats: dict,
                          ann_file: str) -> None:
    """Fills images[id]['height'/'width'] from the file header where the
    JSON has none (in place, on the parsed copy)."""
    todo = [im for im in images.values()
            if im.get('height') is None or im.get('width') is None]
    if not todo:
      return
    unreadable = 0
    for im in todo:
      hw = image_size(os.path.join(image_dir, im['file_name']))
      if hw is None:
        unreadable += 1
        continue
      im['height'], im['width'] = hw
    stats['sizes_read'] = len(todo) - unreadable
    log.warning('%s: images[].height/width: missing for %d of %d images; '
                'read from the image files (%d unreadable)', ann_file, len(todo),
                len(images), unreadable)

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
