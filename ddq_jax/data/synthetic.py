"""A deterministic synthetic detection dataset with learnable structure.

Each image: a textured, noisy background (colour gradient + blobs + noise)
with 1..max objects; the class is the shape type (circle, square, triangle,
cross, ring, diamond, hbar, star), the colour varies per object, and objects
do not overlap, so every box is the exact extent of its drawn pixels
(pixel-edge convention: a shape covering columns x0..x1 has x1 + 1 as its
right edge).  Everything is a pure function of (seed, split, index).
"""
from __future__ import annotations

import argparse
import json
import os

import cv2
import numpy as np

from ddq_jax.data.base import DetectionSource, coco_gt_from_arrays

SHAPES = ('circle', 'square', 'triangle', 'cross', 'ring', 'diamond', 'hbar',
          'star')
_SPLIT_IDS = {'train': 0, 'validation': 1, 'val': 1, 'test': 2}


def _split_id(split: str) -> int:
  return _SPLIT_IDS.get(split, sum(ord(c) for c in split) + 3)


def synthetic_size(*, seed: int, split: str, index: int,
                   size: int) -> tuple[int, int]:
  """(h, w) of synthetic image ``index``: each side in [3/4 size, size]."""
  rng = np.random.default_rng([seed, _split_id(split), index, 0])
  lo = max(8, (3 * size) // 4)
  h, w = rng.integers(lo, size + 1, size=2)
  return int(h), int(w)


def _shape_mask(kind: int, s: int, rng: np.random.Generator) -> np.ndarray:
  """(s, s) uint8 mask of shape ``kind`` touching its bounding square."""
  m = np.zeros((s, s), np.uint8)
  e = s - 1
  name = SHAPES[kind]
  if name == 'circle':
    cv2.circle(m, (e // 2, e // 2), e // 2, 1, -1, lineType=cv2.LINE_8)
  elif name == 'square':
    m[:] = 1
  elif name == 'triangle':
    pts = np.array([[e // 2, 0], [0, e], [e, e]], np.int32)
    cv2.fillPoly(m, [pts], 1, lineType=cv2.LINE_8)
  elif name == 'cross':
    t = max(1, s // 3)
    a = (s - t) // 2
    m[a:a + t, :] = 1
    m[:, a:a + t] = 1
  elif name == 'ring':
    cv2.circle(m, (e // 2, e // 2), e // 2, 1, -1, lineType=cv2.LINE_8)
    cv2.circle(m, (e // 2, e // 2), max(1, e // 4), 0, -1,
               lineType=cv2.LINE_8)
  elif name == 'diamond':
    pts = np.array([[e // 2, 0], [e, e // 2], [e // 2, e], [0, e // 2]],
                   np.int32)
    cv2.fillPoly(m, [pts], 1, lineType=cv2.LINE_8)
  elif name == 'hbar':
    t = max(2, s // 3)
    a = (s - t) // 2
    m[a:a + t, :] = 1
  else:  # star
    ang = np.arange(10) * np.pi / 5 - np.pi / 2
    rad = np.where(np.arange(10) % 2 == 0, e / 2, e / 5)
    pts = np.stack([e / 2 + rad * np.cos(ang), e / 2 + rad * np.sin(ang)], 1)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
  del rng
  return m


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  base = rng.uniform(40, 215, size=3)
  gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
  grad = rng.uniform(-40, 40, size=(2, 3))
  img = (base[None, None] + gy[..., None] / h * grad[0]
         + gx[..., None] / w * grad[1])
  for _ in range(int(rng.integers(2, 6))):  # soft blobs (texture)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    r = rng.uniform(0.1, 0.4) * min(h, w)
    blob = np.exp(-((gy - cy) ** 2 + (gx - cx) ** 2) / (2 * r * r))
    img += blob[..., None] * rng.uniform(-30, 30, size=3)
  img += rng.normal(0, 8, size=img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def render_synthetic(*, seed: int, split: str, index: int, size: int,
                     num_classes: int, max_objects: int,
                     return_masks: bool = False) -> dict:
  """Renders synthetic image ``index`` of ``split``.

  Returns:
    dict(image (h, w, 3) uint8 RGB, boxes (n, 4) float32 xyxy, exact;
    labels (n,) int32 in [0, num_classes); masks (n, h, w) bool if asked).
  """
  h, w = synthetic_size(seed=seed, split=split, index=index, size=size)
  rng = np.random.default_rng([seed, _split_id(split), index, 1])
  img = _background(rng, h, w)
  n_target = int(rng.integers(1, max_objects + 1))
  boxes, labels, masks = [], [], []
  occupied = np.zeros((h, w), bool)
  min_s, max_s = max(6, min(h, w) // 10), max(8, min(h, w) // 3)
  for _ in range(n_target * 8):
    if len(boxes) >= n_target:
      break
    s = int(rng.integers(min_s, max_s + 1))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    kind = int(rng.integers(num_classes))
    colour = rng.integers(0, 256, size=3)
    if occupied[max(0, y - 2):y + s + 2, max(0, x - 2):x + s + 2].any():
      continue
    m = _shape_mask(kind, s, rng).astype(bool)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
      continue
    region = img[y:y + s, x:x + s]
    # Keep the object visible: push the colour away from the local mean.
    local = region.reshape(-1, 3).mean(0)
    if np.abs(colour - local).sum() < 150:
      colour = np.where(local > 127, colour * 0.3, 255 - (255 - colour) * 0.3)
    region[m] = np.clip(colour, 0, 255).astype(np.uint8)
    occupied[y:y + s, x:x + s] = True
    boxes.append([x + xs.min(), y + ys.min(), x + xs.max() + 1,
                  y + ys.max() + 1])
    labels.append(kind)
    if return_masks:
      full = np.zeros((h, w), bool)
      full[y:y + s, x:x + s] = m
      masks.append(full)
  out = dict(image=img, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
             labels=np.asarray(labels, np.int32))
  if return_masks:
    out['masks'] = np.asarray(masks, bool).reshape(-1, h, w)
  return out


class SyntheticSource(DetectionSource):
  """``num_images`` synthetic images; ids are index + 1, categories 1..K."""

  def __init__(self, *, seed: int, split: str, num_images: int, size: int,
               num_classes: int = 8, max_objects: int = 6):
    super().__init__()
    if not 1 <= num_classes <= len(SHAPES):
      raise ValueError(f'synthetic num_classes must be in 1..{len(SHAPES)}')
    self.seed, self.split, self.size = seed, split, size
    self.num_classes, self.max_objects = num_classes, max_objects
    self.image_ids = np.arange(1, num_images + 1, dtype=np.int64)
    self.sizes = np.asarray(
        [synthetic_size(seed=seed, split=split, index=i, size=size)
         for i in range(num_images)], np.int32).reshape(-1, 2)
    self.category_ids = list(range(1, num_classes + 1))
    self.class_names = list(SHAPES[:num_classes])

  def load(self, index: int) -> dict:
    r = render_synthetic(seed=self.seed, split=self.split, index=int(index),
                         size=self.size, num_classes=self.num_classes,
                         max_objects=self.max_objects)
    r['image_id'] = int(self.image_ids[index])
    r['orig_size'] = tuple(int(v) for v in r['image'].shape[:2])
    return r

  def coco_gt(self) -> dict:
    boxes, labels = [], []
    for i in range(len(self)):
      r = render_synthetic(seed=self.seed, split=self.split, index=i,
                           size=self.size, num_classes=self.num_classes,
                           max_objects=self.max_objects)
      boxes.append(r['boxes'])
      labels.append(r['labels'])
    return coco_gt_from_arrays(
        image_ids=self.image_ids, sizes=self.sizes, boxes=boxes,
        labels=labels, category_ids=self.category_ids,
        class_names=self.class_names,
        file_names=[f'{int(i):012d}.png' for i in self.image_ids])


def write_coco_folder(source: SyntheticSource, *, out_dir: str,
                      image_dir: str = 'images',
                      ann_file: str = 'annotations/instances.json',
                      ext: str = 'png') -> tuple[str, str]:
  """Writes ``source`` as a COCO folder: images + instances JSON.

  PNG (default) is lossless, so the folder decodes to the same pixels.
  Returns:
    (images directory, annotation file path).
  """
  img_dir = os.path.join(out_dir, image_dir)
  ann_path = os.path.join(out_dir, ann_file)
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(os.path.dirname(ann_path), exist_ok=True)
  boxes, labels, names = [], [], []
  for i in range(len(source)):
    r = source.load(i)
    name = f'{int(source.image_ids[i]):012d}.{ext}'
    cv2.imwrite(os.path.join(img_dir, name),
                cv2.cvtColor(r['image'], cv2.COLOR_RGB2BGR))
    boxes.append(r['boxes'])
    labels.append(r['labels'])
    names.append(name)
  gt = coco_gt_from_arrays(
      image_ids=source.image_ids, sizes=source.sizes, boxes=boxes,
      labels=labels, category_ids=source.category_ids,
      class_names=source.class_names, file_names=names)
  with open(ann_path, 'w') as f:
    json.dump(gt, f)
  return img_dir, ann_path


def main(argv=None) -> None:
  """``python -m ddq_jax.data.synthetic OUT_DIR [--num N] [--split S]``:
  writes a synthetic COCO folder in the standard layout
  (OUT_DIR/<split>2017/, OUT_DIR/annotations/instances_<split>2017.json), so
  ``data.source='coco_dir', data.coco_dir=OUT_DIR`` reads it."""
  ap = argparse.ArgumentParser(description=main.__doc__)
  ap.add_argument('out_dir')
  ap.add_argument('--num', type=int, default=64)
  ap.add_argument('--split', default='validation')
  ap.add_argument('--size', type=int, default=256)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--num_classes', type=int, default=8)
  ap.add_argument('--max_objects', type=int, default=6)
  ap.add_argument('--ext', default='png', choices=('png', 'jpg'))
  a = ap.parse_args(argv)
  sub = {'train': 'train2017', 'validation': 'val2017',
         'val': 'val2017'}.get(a.split, a.split)
  src = SyntheticSource(seed=a.seed, split=a.split, num_images=a.num,
                        size=a.size, num_classes=a.num_classes,
                        max_objects=a.max_objects)
  img_dir, ann = write_coco_folder(
      src, out_dir=a.out_dir, image_dir=sub,
      ann_file=f'annotations/instances_{sub}.json', ext=a.ext)
  print(f'wrote {len(src)} images to {img_dir} and {ann}')


if __name__ == '__main__':
  main()
