"""Detections drawn on images: ``predict --draw`` and the training run's
drawings at each evaluation (``WORKDIR/drawings/step_N/*.png`` and
TensorBoard).

    rgb = draw_detections(image, records)          # COCO-style records
    write_png(path, rgb)
    drawings = draw_eval_images(source, detections, image_ids=[7, 9],
                                score_threshold=0.3)  # [(name, rgb)]

Records are ``serve.detect.detection_records``' dicts: bbox [x, y, w, h] in
the image's pixels, category_id, score and, where known, category_name.
OpenCV (the image decoder of the data pipeline) draws and writes the PNGs.
"""
from __future__ import annotations

import os
import zlib
from typing import Mapping, Optional, Sequence

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Smaller images are drawn enlarged (whole pixels) to a short side of at
# least this, so the tags stay legible.
MIN_DRAWN_SIDE = 320


def category_color(name: str) -> tuple[int, int, int]:
  """A fixed light RGB colour per class name (the tag text stays black)."""
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  return tuple(int(c) for c in rng.integers(64, 256, 3))


def draw_detections(image: np.ndarray, records: Sequence[dict], *,
                    category_names: Optional[Mapping[int, str]] = None,
                    min_side: int = MIN_DRAWN_SIDE) -> np.ndarray:
  """``image`` (h, w, 3) uint8 RGB with each record's box and a
  'name score' tag drawn (a new array; ``image`` is not changed).

  The name is the record's 'category_name', else ``category_names``'
  entry for its category_id, else the id.  An image whose short side is
  under ``min_side`` is enlarged k times first (nearest pixel, boxes
  scaled), so the result is (k h, k w, 3)."""
  canvas = np.ascontiguousarray(image, np.uint8)
  k = max(1, -(-int(min_side) // max(1, min(canvas.shape[:2]))))
  if k > 1:
    canvas = cv2.resize(canvas, None, fx=k, fy=k,
                        interpolation=cv2.INTER_NEAREST)
    records = [dict(r, bbox=[v * k for v in r['bbox']]) for r in records]
  canvas = canvas.copy()
  names = category_names or {}
  scale = max(0.5, min(1.0, min(canvas.shape[:2]) / 1000.0))
  thick = 2
  for rec in records:
    x, y, w, h = rec['bbox']
    cat = int(rec['category_id'])
    name = str(rec.get('category_name', names.get(cat, cat)))
    color = category_color(name)
    p1 = (int(round(x)), int(round(y)))
    p2 = (int(round(x + w)), int(round(y + h)))
    cv2.rectangle(canvas, p1, p2, color, thick)
    label = f"{name} {float(rec['score']):.2f}"
    (tw, th), _ = cv2.getTextSize(label, _FONT, scale, 1)
    top, left = max(p1[1] - th - 4, 0), max(p1[0], 0)
    cv2.rectangle(canvas, (left, top), (left + tw + 2, top + th + 4), color,
                  -1)
    cv2.putText(canvas, label, (left + 1, top + th + 1), _FONT, scale,
                (0, 0, 0), 1, cv2.LINE_AA)
  return canvas


def png_bytes(rgb: np.ndarray) -> bytes:
  """An (h, w, 3) uint8 RGB array encoded as PNG."""
  ok, data = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_PNG_COMPRESSION, 9])
  if not ok:
    raise ValueError(f'cannot encode an array of shape {rgb.shape} as PNG')
  return data.tobytes()


def write_png(path: str, rgb: np.ndarray) -> None:
  """Writes an (h, w, 3) uint8 RGB array as a PNG file."""
  with open(path, 'wb') as f:
    f.write(png_bytes(rgb))


def drawing_paths(paths: Sequence[str], draw_dir: str) -> list[str]:
  """One PNG path in ``draw_dir`` per image: ``<stem>.png``, or
  ``<stem>-2.png``, ``-3``... when another image of this call has the same
  stem or the file already exists; no drawing ever overwrites a file.

  Args:
    paths: the input image paths, in order.
    draw_dir: the output directory.
  Returns:
    list of output paths, all distinct and not existing yet.
  """
  taken, out = set(), []
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0] or 'image'
    n, name = 1, os.path.join(draw_dir, f'{stem}.png')
    while name in taken or os.path.lexists(name):
      n += 1
      name = os.path.join(draw_dir, f'{stem}-{n}.png')
    taken.add(name)
    out.append(name)
  return out


def draw_eval_images(source, detections: Sequence[dict], *,
                     image_ids: Sequence[int], score_threshold: float
                     ) -> list[tuple[str, np.ndarray]]:
  """Images of ``source`` (a ``DetectionSource``) with their detections at
  or above ``score_threshold``.

  Args:
    source: the evaluated split (image_ids, load, category_ids,
      class_names).
    detections: ``evaluate_model``'s COCO results (image_id, category_id,
      bbox, score).
    image_ids: the images to draw, in order (e.g. the first evaluated ones:
      ``evaluate_model``'s metrics['image_ids']).
    score_threshold: the lowest score drawn.
  Returns:
    [('image_<image_id>', (h, w, 3) uint8 RGB)]: ``draw_detections`` of
    the original image; an image that cannot be read is left out.
  """
  chosen: dict[int, list[dict]] = {int(i): [] for i in image_ids}
  if not chosen:
    return []
  for det in detections:
    records = chosen.get(int(det['image_id']))
    if records is not None and det['score'] >= score_threshold:
      records.append(det)
  names = dict(zip((int(c) for c in source.category_ids),
                   source.class_names))
  index = {int(i): k for k, i in enumerate(np.asarray(source.image_ids))}
  out = []
  for image_id, records in chosen.items():
    image = source.load(index[image_id])['image']
    if image is None:
      continue
    out.append((f'image_{image_id}',
                draw_detections(image, records, category_names=names)))
  return out
