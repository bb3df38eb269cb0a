"""Detect objects in images with a DDQ-DETR checkpoint.

    python -m ddq_jax.predict --weights WEIGHTS IMAGE [IMAGE ...] [--draw DIR]
        [--config PATH|NAME] [--config.KEY=VALUE ...]

WEIGHTS is a directory written by convert_weights.py (its config.json gives
the architecture) or an mmdetection .pth (converted on the fly).  Images are
decoded and resized exactly like the reference's test pipeline (OpenCV,
keep-ratio resize to config.data.test_scale) by ``ddq_jax.Detector``, on
the static canvas of their orientation, so the model compiles once per
canvas.  Prints COCO-style JSON:
one record per detection with image file, category_id (the label) and
category name, bbox [x, y, w, h] in original pixels, score.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ddq_jax import cli


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


def drawing_paths(paths, draw_dir: str) -> list[str]:
  """One PNG path in ``draw_dir`` per image: ``<stem>.png``, or
  ``<stem>-2.png``, ``-3``... when another image of this call has the same
  stem or the file already exists; no drawing ever overwrites a file.

  Args:
    paths: the input image paths, in order.
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


def predict_files(paths, *, weights: str, config=None,
                  overrides: dict | None = None,
                  score_threshold: float = 0.3, draw_dir: str | None = None
                  ) -> list[dict]:
  """Detections (COCO-style records) of image files.  ``config``: the
  architecture, default the one stored with the weights (then
  ``overrides`` apply to it)."""
  from ddq_jax.api import Detector
  from ddq_jax.data.transforms import read_image

  det = Detector.load(weights, config=config, overrides=overrides,
                      batch_size=max(1, min(len(paths), 8)))
  results = det(list(paths), score_threshold=score_threshold)
  records = []
  if draw_dir:
    os.makedirs(draw_dir, exist_ok=True)
    drawings = drawing_paths(paths, draw_dir)
  for i, (path, result) in enumerate(zip(paths, results)):
    dets = result.to_records(path)
    records += dets
    if draw_dir:
      draw_detections(read_image(path), dets, drawings[i])
      print(f'drawing: {path} -> {drawings[i]}', file=sys.stderr)
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ddq_jax.predict', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('images', nargs='+', help='image files')
  parser.add_argument('--weights', required=True,
                      help='converted weights directory or mmdetection .pth')
  cli.add_config_argument(parser, help_text='default: the one stored with '
                          'the weights.')
  parser.add_argument('--score-threshold', type=float, default=0.3,
                      help='drop detections below this score (default 0.3)')
  parser.add_argument('--draw', default=None, metavar='DIR',
                      help='also write DIR/<image stem>.png with the boxes '
                      'drawn (<stem>-2.png ... when the name is taken: '
                      'nothing is overwritten)')
  parser.add_argument('--out', default=None,
                      help='write the JSON here instead of standard output')
  args, overrides = cli.parse_args(parser, argv)
  config = (cli.load_or_fail(parser, args.config, overrides)
            if args.config else None)
  from ddq_jax.compilation_cache import enable_compilation_cache; enable_compilation_cache()  # pylint: disable=g-import-not-at-top,multiple-statements
  try:
    records = predict_files(args.images, weights=args.weights,
                            config=config, overrides=overrides,
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
