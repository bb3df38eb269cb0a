"""Detect objects in images with a DDQ-DETR checkpoint.

    python -m ddq_jax.predict --weights WEIGHTS IMAGE [IMAGE ...] [--draw DIR]

WEIGHTS is a directory written by convert_weights.py (its config.json gives
the architecture) or an mmdetection .pth (converted on the fly).  Images are
decoded and resized exactly like the reference's test pipeline (OpenCV,
keep-ratio resize to config.data.test_scale); all images of one call are
padded to one canvas so the model compiles once.  Prints COCO-style JSON:
one record per detection with image file, category_id (the label) and
category name, bbox [x, y, w, h] in original pixels, score.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def _load_images(paths, config):
  from ddq_jax.data.transforms import apply_test_transform, read_image
  samples = []
  for path in paths:
    image = read_image(path)
    if image is None:
      raise ValueError(f'{path}: missing or not a decodable image '
                       '(expected a JPEG/PNG/... file OpenCV can read)')
    out = apply_test_transform(image, np.zeros((0, 4), np.float32),
                               np.zeros((0,), np.int64),
                               scale=tuple(config.data.test_scale))
    out['orig'] = image
    samples.append(out)
  return samples


def _batch(samples, config):
  h = max(s['img_shape'][0] for s in samples)
  w = max(s['img_shape'][1] for s in samples)
  mean = np.asarray(config.data.mean, np.float32)
  std = np.asarray(config.data.std, np.float32)
  b = len(samples)
  images = np.zeros((b, h, w, 3), np.float32)
  pad_mask = np.ones((b, h, w), bool)
  for i, s in enumerate(samples):
    ih, iw = s['img_shape']
    images[i, :ih, :iw] = (s['image'].astype(np.float32) - mean) / std
    pad_mask[i, :ih, :iw] = False
  img_shapes = np.array([s['img_shape'] for s in samples], np.int32)
  scale_factors = np.array([s['scale_factor'] for s in samples], np.float32)
  return images, pad_mask, img_shapes, scale_factors


def draw_detections(image: np.ndarray, dets: list[dict],
                    path: str) -> None:
  """Writes ``image`` (RGB uint8) with boxes, names and scores as a PNG."""
  import cv2
  canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR).copy()
  for det in dets:
    x, y, w, h = det['bbox']
    color = tuple(int(c) for c in np.random.default_rng(
        det['category_id']).integers(64, 256, 3))
    p1, p2 = (int(round(x)), int(round(y))), (int(round(x + w)),
                                              int(round(y + h)))
    cv2.rectangle(canvas, p1, p2, color, 2)
    label = f"{det['category_name']} {det['score']:.2f}"
    (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    top = max(p1[1] - th - 4, 0)
    cv2.rectangle(canvas, (p1[0], top), (p1[0] + tw + 2, top + th + 4), color,
                  -1)
    cv2.putText(canvas, label, (p1[0] + 1, top + th + 1),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
  if not cv2.imwrite(path, canvas):
    raise OSError(f'could not write {path}')


def predict_files(paths, *, weights: str, config_path: str | None = None,
                  score_threshold: float = 0.3, draw_dir: str | None = None
                  ) -> list[dict]:
  from ddq_jax.class_names import class_names_for
  from ddq_jax.config import load_config
  from ddq_jax.models.detector import build_model
  from ddq_jax.models.inference import make_predict_fn
  from ddq_jax.weights import load_weights

  config = load_config(config_path) if config_path else None
  variables, config = load_weights(weights, config)
  names = class_names_for(config)
  samples = _load_images(paths, config)
  predict = make_predict_fn(build_model(config))
  out = predict(variables, *_batch(samples, config))
  out = {k: np.asarray(v) for k, v in out.items()}
  records = []
  for i, path in enumerate(paths):
    dets = []
    for box, score, label, valid in zip(out['boxes'][i], out['scores'][i],
                                        out['labels'][i], out['valid'][i]):
      if not valid or score < score_threshold:
        continue
      x1, y1, x2, y2 = (float(v) for v in box)
      dets.append(dict(image=path, category_id=int(label),
                       category_name=names[int(label)],
                       bbox=[round(x1, 2), round(y1, 2), round(x2 - x1, 2),
                             round(y2 - y1, 2)],
                       score=round(float(score), 5)))
    records += dets
    if draw_dir:
      os.makedirs(draw_dir, exist_ok=True)
      stem = os.path.splitext(os.path.basename(path))[0]
      draw_detections(samples[i]['orig'], dets,
                      os.path.join(draw_dir, f'{stem}.png'))
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ddq_jax.predict', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('images', nargs='+', help='image files')
  parser.add_argument('--weights', required=True,
                      help='converted weights directory or mmdetection .pth')
  parser.add_argument('--config', default=None,
                      help='config name or path (default: the one stored '
                      'with the weights)')
  parser.add_argument('--score-threshold', type=float, default=0.3,
                      help='drop detections below this score (default 0.3)')
  parser.add_argument('--draw', default=None, metavar='DIR',
                      help='also write DIR/<image>.png with the boxes drawn')
  parser.add_argument('--out', default=None,
                      help='write the JSON here instead of standard output')
  args = parser.parse_args(argv)
  from ddq_jax.compilation_cache import enable_compilation_cache; enable_compilation_cache()  # pylint: disable=g-import-not-at-top,multiple-statements
  try:
    records = predict_files(args.images, weights=args.weights,
                            config_path=args.config,
                            score_threshold=args.score_threshold,
                            draw_dir=args.draw)
  except (ValueError, TypeError, FileNotFoundError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  text = json.dumps(records, indent=1)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
    print(f'{len(records)} detections -> {args.out}')
  else:
    print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
