"""Detect objects in images with a DDQ-DETR checkpoint.

    python -m ddq_jax predict --weights WEIGHTS IMAGE [IMAGE ...] [--draw DIR]
        [--config PATH|NAME] [--config.KEY=VALUE ...]

WEIGHTS is a directory written by convert_weights.py (its config.json gives
the architecture) or an mmdetection .pth (converted on the fly).  Images are
decoded and resized exactly like the reference's test pipeline (OpenCV,
keep-ratio resize to config.data.test_scale) by ``ddq_jax.Detector``, on
the static canvas of their orientation, so the model compiles once per
canvas, through the same inference program that ``evaluate`` measures
(``serve.detect``).  Prints COCO-style JSON (``detect.detection_records``):
one record per detection with image file, category_id (the label) and
category name, bbox [x, y, w, h] in original pixels, score.  ``--draw DIR``
also writes each image with its boxes (``serve.drawing``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ddq_jax import cli
from ddq_jax.compilation_cache import enable_compilation_cache
from ddq_jax.data.transforms import read_image
from ddq_jax.io.outputs import check_out_file, OutputPathError, write_text
from ddq_jax.serve.api import Detector
from ddq_jax.serve.drawing import draw_detections, drawing_paths, write_png


def read_images(paths, *, skip_bad: bool = False, report=print
                ) -> tuple[list[str], list]:
  """(the paths that decode, their RGB arrays).  A missing or undecodable
  file is a ValueError naming it, or with ``skip_bad`` a line to
  ``report`` ('skipped IMAGE: why') and a count at the end."""
  good, arrays, skipped = [], [], 0
  for path in paths:
    why = None
    if not os.path.isfile(path):
      why = 'no such file'
    else:
      arr = read_image(path)
      if arr is None or 0 in arr.shape[:2]:
        why = 'not a decodable image (JPEG/PNG/... that OpenCV reads)'
    if why is None:
      good.append(path)
      arrays.append(arr)
    elif skip_bad:
      skipped += 1
      report(f'skipped {path}: {why}')
    else:
      raise ValueError(f'image {path}: {why}; --skip-bad-images skips such '
                       'images')
  if skipped:
    report(f'{skipped} of {len(paths)} images skipped')
  return good, arrays


def predict_files(paths, *, weights: str, config=None,
                  overrides: dict | None = None,
                  score_threshold: float = 0.3, draw_dir: str | None = None,
                  skip_bad: bool = False) -> list[dict]:
  """Detections (COCO-style records) of image files.  ``config``: the
  architecture, default the one stored with the weights (then
  ``overrides`` apply to it).  ``skip_bad``: see ``read_images``."""

  report = lambda line: print(line, file=sys.stderr, flush=True)
  good, arrays = read_images(paths, skip_bad=skip_bad, report=report)
  det = Detector.load(weights, config=config, overrides=overrides,
                      batch_size=max(1, min(len(good), 8)))
  results = det(arrays, score_threshold=score_threshold) if good else []
  records = []
  if draw_dir:
    os.makedirs(draw_dir, exist_ok=True)
    drawings = drawing_paths(good, draw_dir)
  for i, (path, result) in enumerate(zip(good, results)):
    dets = result.to_records(path)
    records += dets
    if draw_dir:
      write_png(drawings[i], draw_detections(arrays[i], dets))
      report(f'drawing: {path} -> {drawings[i]}')
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ddq_jax predict', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('images', nargs='+', help='image files')
  parser.add_argument('--weights', required=True,
                      help='converted weights directory or mmdetection .pth')
  cli.add_config_argument(parser, help_text='default: the one stored with '
                          'the weights.')
  parser.add_argument('--score-threshold', type=float, default=0.3,
                      help='drop detections below this score, in [0, 1] '
                      '(default 0.3)')
  parser.add_argument('--draw', default=None, metavar='DIR',
                      help='also write DIR/<image stem>.png with the boxes '
                      'drawn (<stem>-2.png ... when the name is taken: '
                      'nothing is overwritten)')
  parser.add_argument('--out', default=None,
                      help='write the JSON to this file instead of standard '
                      'output (checked before any work: its directory must '
                      'exist; an existing file is kept unless --overwrite)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing --out file')
  parser.add_argument('--skip-bad-images', action='store_true',
                      help='skip images that are missing or do not decode '
                      '(each named on stderr, then the count); by default '
                      'such an image stops the command before any work')
  args, overrides = cli.parse_args(parser, argv)
  if not 0.0 <= args.score_threshold <= 1.0:
    cli.fail(parser, f'--score-threshold {args.score_threshold}: expected a '
             'score in [0, 1]')
  try:
    if args.out:
      check_out_file(args.out, overwrite=args.overwrite)
    if args.draw and os.path.lexists(args.draw) and not os.path.isdir(
        args.draw):
      raise OutputPathError(f'--draw {args.draw}: an existing file, not a '
                            'directory')
  except OutputPathError as e:
    cli.fail(parser, str(e))
  config = (cli.load_or_fail(parser, args.config, overrides)
            if args.config else None)
  enable_compilation_cache()
  try:
    records = predict_files(args.images, weights=args.weights,
                            config=config, overrides=overrides,
                            score_threshold=args.score_threshold,
                            draw_dir=args.draw,
                            skip_bad=args.skip_bad_images)
    text = json.dumps(records, indent=1)
    if args.out:
      write_text(args.out, text + '\n')
  except (ValueError, TypeError, FileNotFoundError, OSError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  if args.out:
    print(f'{len(records)} detections -> {args.out}')
  else:
    print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
