"""TFDS ``coco/2017`` read without TensorFlow.

Reading: ``tfds.builder_from_directory(dir).as_data_source(split)`` gives
numpy records (no TensorFlow).  We ask TFDS to skip image decoding where it
can and decode the stored JPEG bytes with OpenCV ``IMREAD_COLOR`` exactly as
mmcv does (TFDS's own numpy decoder uses ``IMREAD_UNCHANGED``, which ignores
EXIF orientation); already-decoded arrays are accepted too.

Record layout (the coco/2017 feature spec):
  image            encoded bytes or (h, w, 3|1) uint8
  image/id         int64, the COCO image id
  objects/bbox     (n, 4) float32 normalised (ymin, xmin, ymax, xmax)
  objects/label    (n,) int64, index into the 80 categories sorted by id
  objects/is_crowd (n,) bool

Preparing coco/2017 once (needs TensorFlow only for this step)::

    pip install tensorflow-cpu tensorflow-datasets importlib_resources
    python -c "import tensorflow_datasets as tfds; \
      tfds.builder('coco/2017', data_dir='/data/tfds').download_and_prepare(\
        file_format='array_record')"

then set ``data.source='tfds'`` and ``data.tfds_data_dir`` to the prepared
version directory (``/data/tfds/coco/2017/1.1.0``) or to ``/data/tfds``.
Note: TFDS stores boxes normalised in float32, so they differ from the JSON
by ~1e-4 px; the evaluator should use the instances JSON (pass
``data.coco_dir`` / the JSON path) when available, or ``coco_gt()`` here.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds

from ddq_jax.data.base import DetectionSource, coco_gt_from_arrays, log
from ddq_jax.data.class_names import COCO_CATEGORY_IDS
from ddq_jax.data.transforms import decode_image


def _get(record: Mapping[str, Any], key: str):
  """Reads 'objects/bbox' from a nested or a flat record."""
  if key in record:
    return record[key]
  head, _, tail = key.partition('/')
  if tail and head in record and isinstance(record[head], Mapping):
    return _get(record[head], tail)
  raise KeyError(f'TFDS record has no feature {key!r}; has {list(record)}')


def _resolve_dir(data_dir: str, name: str) -> str:
  """Accepts the prepared version dir or a TFDS data_dir root."""
  if os.path.isfile(os.path.join(data_dir, 'dataset_info.json')):
    return data_dir
  base = os.path.join(data_dir, *name.split('/'))
  if os.path.isdir(base):
    if os.path.isfile(os.path.join(base, 'dataset_info.json')):
      return base
    versions = sorted(v for v in os.listdir(base)
                      if os.path.isfile(os.path.join(base, v,
                                                     'dataset_info.json')))
    if versions:
      return os.path.join(base, versions[-1])
  raise FileNotFoundError(
      f'no prepared TFDS dataset {name!r} under {data_dir!r} (expected '
      f'{base}/<version>/dataset_info.json); see ddq_jax/data/tfds_source.py '
      'for how to prepare it once')


def open_tfds_source(*, data_dir: str, name: str, split: str):
  """Opens a prepared TFDS dataset as a numpy random-access source."""
  builder = tfds.builder_from_directory(_resolve_dir(data_dir, name))
  try:
    src = builder.as_data_source(
        split, decoders={'image': tfds.decode.SkipDecoding()})
  except Exception:  # pylint: disable=broad-except
    src = builder.as_data_source(split)
  names = None
  try:
    names = list(builder.info.features['objects']['label'].names)
  except Exception:  # pylint: disable=broad-except
    pass
  return src, names


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
  """(h, w) from a JPEG's SOF or a PNG's IHDR header, None if unknown.

  Note: the stored size; OpenCV's IMREAD_COLOR applies EXIF orientation,
  so a rotated JPEG decodes transposed (the loaders handle a mismatch).
  """
  if data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) >= 24:
    return (int.from_bytes(data[20:24], 'big'),
            int.from_bytes(data[16:20], 'big'))
  if data[:2] != b'\xff\xd8':
    return None
  i = 2
  while i + 9 < len(data):
    if data[i] != 0xFF:
      i += 1
      continue
    marker = data[i + 1]
    if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
      i += 1 if marker == 0xFF else 2
      continue
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
      return (int.from_bytes(data[i + 5:i + 7], 'big'),
              int.from_bytes(data[i + 7:i + 9], 'big'))
    i += 2 + int.from_bytes(data[i + 2:i + 4], 'big')
  return None


class TfdsSource(DetectionSource):
  """Adapter from a TFDS-layout random-access source to DetectionSource.

  Args:
    records: anything with __len__ and __getitem__ returning records in the
      layout above (a TFDS data source, or a list of dicts in tests).
    category_ids: contiguous label -> category id (default: COCO's 80 ids
      when there are 80 classes, else 1..K).
    class_names: names (default: 'class_<id>').
  """

  def __init__(self, records, *, category_ids: Sequence[int] | None = None,
               class_names: Sequence[str] | None = None):
    super().__init__()
    self.records = records
    if category_ids is None:  # coco/2017's 80 labels, else 1..K
      category_ids = (COCO_CATEGORY_IDS if class_names is None
                      or len(class_names) == len(COCO_CATEGORY_IDS)
                      else range(1, len(class_names) + 1))
    self.category_ids = [int(c) for c in category_ids]
    self.class_names = list(class_names or
                            [f'class_{c}' for c in self.category_ids])
    self.image_ids = None
    self.sizes = None  # unknown without decoding every image
    self.stats.update(crowd=0, invalid_box=0)

  def __len__(self) -> int:
    return len(self.records)

  @property
  def image_ids(self):  # noqa: F811 - lazily read (one pass over records)
    if self._ids is None:
      self._ids = np.asarray([int(_get(self.records[i], 'image/id'))
                              for i in range(len(self.records))], np.int64)
    return self._ids

  @image_ids.setter
  def image_ids(self, value):
    self._ids = value

  def load_index(self, path: str) -> None:
    """Loads (or builds once, then saves) ``path``: an .npz of every
    record's image id and (h, w), so training can group batches by
    orientation and every host agrees on canvases.  Building reads every
    record once (image bytes included) and parses only the headers."""
    if os.path.isfile(path):
      z = np.load(path)
      if len(z['image_ids']) != len(self):
        raise ValueError(f'{path}: index of {len(z["image_ids"])} records, '
                         f'the split has {len(self)}; delete it to rebuild')
      self._ids, self.sizes = z['image_ids'], z['sizes']
      return
    ids = np.zeros((len(self),), np.int64)
    sizes = np.zeros((len(self), 2), np.int32)
    for i in range(len(self)):
      rec = self.records[i]
      ids[i] = int(_get(rec, 'image/id'))
      raw = _get(rec, 'image')
      hw = (image_size_from_header(bytes(raw))
            if isinstance(raw, (bytes, bytearray, memoryview)) else None)
      if hw is None:
        img = self._decode(raw)
        hw = img.shape[:2] if img is not None else (0, 0)
      sizes[i] = hw
      if i % 10000 == 0:
        log.info('TFDS size index: %d / %d', i, len(self))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, image_ids=ids, sizes=sizes)
    os.replace(tmp, path)
    self._ids, self.sizes = ids, sizes

  def _decode(self, raw) -> np.ndarray | None:
    if isinstance(raw, (bytes, bytearray, memoryview)):
      return decode_image(bytes(raw))
    arr = np.asarray(raw)
    if arr.dtype == object and arr.ndim == 0:  # bytes in a 0-d array
      return decode_image(bytes(arr.item()))
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or arr.size == 0:
      return None
    if arr.ndim == 2 or arr.shape[-1] == 1:
      arr = cv2.cvtColor(arr.reshape(arr.shape[:2]), cv2.COLOR_GRAY2RGB)
    return arr[..., :3]

  def load(self, index: int) -> dict:
    rec = self.records[index]
    image_id = int(_get(rec, 'image/id'))
    try:
      image = self._decode(_get(rec, 'image'))
    except Exception:  # pylint: disable=broad-except
      image = None
    bbox = np.asarray(_get(rec, 'objects/bbox'), np.float32).reshape(-1, 4)
    label = np.asarray(_get(rec, 'objects/label'), np.int64).reshape(-1)
    try:
      crowd = np.asarray(_get(rec, 'objects/is_crowd'), bool).reshape(-1)
    except KeyError:
      crowd = np.zeros(len(label), bool)
    if image is None:
      self.count_unreadable(f'TFDS record {index} (image id {image_id})')
      return dict(image=None, boxes=np.zeros((0, 4), np.float32),
                  labels=np.zeros((0,), np.int32), image_id=image_id,
                  orig_size=(0, 0))
    h, w = image.shape[:2]
    boxes = self.denormalize(bbox, height=h, width=w)
    keep = ~crowd & (label >= 0) & (label < len(self.category_ids))
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep &= (bw * bh > 0)
    return dict(image=image, boxes=boxes[keep],
                labels=label[keep].astype(np.int32), image_id=image_id,
                orig_size=(h, w))

  @staticmethod
  def denormalize(bbox: np.ndarray, *, height: int, width: int) -> np.ndarray:
    """(n, 4) normalised (ymin, xmin, ymax, xmax) -> clipped pixel xyxy."""
    b = np.asarray(bbox, np.float64).reshape(-1, 4)
    out = np.stack([b[:, 1] * width, b[:, 0] * height, b[:, 3] * width,
                    b[:, 2] * height], 1)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, width)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, height)
    return out.astype(np.float32)

  def coco_gt(self) -> dict:
    """Ground truth rebuilt from the records (decodes every image once);
    prefer the original instances JSON for official numbers."""
    ids, sizes, boxes, labels = [], [], [], []
    for i in range(len(self)):
      r = self.load(i)
      if r['image'] is None:
        continue
      ids.append(r['image_id'])
      sizes.append(r['orig_size'])
      boxes.append(r['boxes'])
      labels.append(r['labels'])
    return coco_gt_from_arrays(image_ids=ids, sizes=sizes, boxes=boxes,
                               labels=labels, category_ids=self.category_ids,
                               class_names=self.class_names)
