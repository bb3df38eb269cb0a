"""Evaluate a DDQ-DETR checkpoint on COCO (or the synthetic split).

  python -m ddq_jax evaluate --config ddq_r50_4scale --weights ddq_r50.pth \\
      --coco-dir /data/coco --out runs/eval_r50
  python -m ddq_jax evaluate --weights weights/ddq_r50 --tfds coco/2017 \\
      --tfds-data-dir ~/tensorflow_datasets --split validation --out runs/eval
  python -m ddq_jax evaluate --weights runs/r50 --ann-file val.json \\
      --image-dir images/ --out runs/eval      # any COCO-format layout
  python -m ddq_jax evaluate --config tiny --weights tests/data/tiny/checkpoint.pth \\
      --out runs/eval_tiny --max-images 16 --config.eval.batch_size=4

By default each image gets its batch-1 unpadded result whatever canvas and
neighbours it is batched with (config padding_invariant;
--config.padding_invariant=False gives the reference's batched padding), and the
canvases (data.eval_canvas_sizes) keep COCO to at most 3 compiles.  Crowd
regions stay in the ground truth the metrics see: ignore regions, as in
pycocotools.

Writes OUT/metrics.json (the 12 COCO box numbers AP ... ARl, plus the
images evaluated and dropped, detection counts, timing, devices) and
OUT/detections.json (COCO results: image_id, category_id, bbox [x, y, w, h]
in original pixels, score).  --out is checked before any work: its parent
must exist, and earlier results in it are kept unless --overwrite.

Bad images: by default (--strict) an image that cannot be evaluated is an
error, because an AP over a subset of the split is not comparable with
published numbers: image files missing at start-up stop the command before
any work; images that fail to decode during the run are recorded in
metrics.json and the command exits 2.  --skip-bad-images evaluates the
rest, names each dropped image and records them (exit 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from ddq_jax import cli
from ddq_jax.compilation_cache import enable_compilation_cache
from ddq_jax.data import build_dataset, make_eval_iterator
from ddq_jax.evaluation import evaluate_model
from ddq_jax.io.outputs import check_out_dir, OutputPathError, write_text
from ddq_jax.io.weights import load_weights
from ddq_jax.model.detector import build_model
from ddq_jax.model.variables import init_variables
from ddq_jax.serve.detect import jit_detect_fn
from ddq_jax.train.parallel.mesh import make_mesh


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m ddq_jax evaluate',
      description=__doc__.split('\n\n')[0] + '  Runs the jitted model over '
      'the eval split in static batches sharded over the local devices and '
      'computes the 12 COCO box metrics with faster-coco-eval.',
      epilog='Data source: --coco-dir (a COCO folder: val2017/ + '
      'annotations/instances_val2017.json), --ann-file FILE --image-dir DIR '
      '(any COCO-format layout), --tfds (a prepared TFDS dataset), or '
      'none: the config\'s data.source (synthetic shapes by default).',
      formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_config_argument(p, help_text='default: the config stored with '
                          'the weights.')
  p.add_argument('--weights', help='converted weights directory, an '
                 'mmdetection .pth checkpoint, a train.py workdir (its latest '
                 'checkpoint) or one of its checkpoints/<step> directories '
                 '(required unless --random-init)')
  p.add_argument('--random-init', action='store_true',
                 help='random weights (smoke runs; needs --config)')
  src = p.add_mutually_exclusive_group()
  src.add_argument('--coco-dir', help='COCO root with <split>2017/ and '
                   'annotations/instances_<split>2017.json')
  src.add_argument('--tfds', metavar='NAME', help='TFDS dataset, e.g. '
                   'coco/2017 (prepared; see --tfds-data-dir)')
  src.add_argument('--ann-file', metavar='FILE', help='a COCO instances '
                   'JSON (any layout; with --image-dir)')
  p.add_argument('--image-dir', metavar='DIR', help='the directory holding '
                 "--ann-file's file_names")
  p.add_argument('--tfds-data-dir', help='TFDS data dir holding the '
                 'prepared dataset')
  p.add_argument('--split', help='split name (default config '
                 'data.eval_split, "validation")')
  p.add_argument('--out', required=True, help='output directory (its parent '
                 'must exist; checked before any work)')
  p.add_argument('--overwrite', action='store_true', help='replace '
                 'metrics.json / detections.json of an earlier run in --out')
  bad = p.add_mutually_exclusive_group()
  bad.add_argument('--strict', action='store_true', default=True,
                   help='(default) an image that is missing or does not '
                   'decode is an error (exit 2): the AP of a subset is not '
                   'the AP of the split')
  bad.add_argument('--skip-bad-images', action='store_true',
                   help='evaluate the other images; each dropped image is '
                   'named on stderr and recorded in metrics.json')
  p.add_argument('--max-images', type=int, help='evaluate only the first N '
                 'images (quick runs)')
  p.add_argument('--batch-size', type=int, help='images per step (default '
                 'config eval.batch_size; padded to a multiple of --devices)')
  p.add_argument('--devices', type=int, help='use the first K devices '
                 '(default all devices of all processes)')
  p.add_argument('--num-workers', type=int, help='data loader processes '
                 '(default config data.num_workers)')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  return p


RESULT_FILES = ('metrics.json', 'detections.json')


def _missing_at_start(source) -> list[str]:
  return list(getattr(source, 'missing_files', ()) or ())


def _check_args(parser, args) -> None:
  """Every flag's value checked before any work (usage errors, exit 2)."""
  if not args.weights and not args.random_init:
    cli.fail(parser, '--weights is required (or --random-init for a smoke run)')
  if args.random_init and not args.config:
    cli.fail(parser, '--random-init needs --config')
  if args.weights and not os.path.exists(args.weights):
    cli.fail(parser, f'--weights {args.weights}: no such file or directory '
                 '(expected a converted weights directory or an mmdetection '
                 '.pth)')
  if bool(args.ann_file) != bool(args.image_dir):
    parser.error('--ann-file and --image-dir go together')
  if args.ann_file and not os.path.isfile(args.ann_file):
    parser.error(f'--ann-file {args.ann_file}: no such file')
  if args.image_dir and not os.path.isdir(args.image_dir):
    parser.error(f'--image-dir {args.image_dir}: no such directory')
  if args.coco_dir and not os.path.isdir(args.coco_dir):
    cli.fail(parser, f'--coco-dir {args.coco_dir}: no such directory')
  if args.tfds_data_dir and not os.path.isdir(args.tfds_data_dir):
    cli.fail(parser, f'--tfds-data-dir {args.tfds_data_dir}: no such directory')
  if args.max_images is not None and args.max_images < 1:
    cli.fail(parser, '--max-images must be >= 1')
  for flag, value in (('--batch-size', args.batch_size),
                      ('--devices', args.devices),
                      ('--num-workers', args.num_workers)):
    if value is not None and value < (0 if flag == '--num-workers' else 1):
      cli.fail(parser, f'{flag} {value}: expected >= '
               f'{0 if flag == "--num-workers" else 1}')
  try:
    check_out_dir(args.out, RESULT_FILES, overwrite=args.overwrite)
  except OutputPathError as e:
    cli.fail(parser, str(e))


def _load_model(parser, args, overrides):
  """(variables, config): the weights and their config (or --config), or a
  random initialisation of --config."""
  config = (cli.load_or_fail(parser, args.config, overrides)
            if args.config else None)
  if args.random_init:
    variables = jax.jit(lambda r: init_variables(build_model(config), config,
                                                 r))(jax.random.key(0))
    return variables, config
  try:
    return load_weights(args.weights, config,
                        overrides=None if args.config else overrides)
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(parser, f'--weights {args.weights}: cannot load: '
                 f'{type(e).__name__}: {e}')


def _data_from_flags(config, args) -> str:
  """The data flags onto ``config.data``; the split to evaluate."""
  d = config.data
  if args.ann_file:
    d.source = 'coco_dir'
    d.eval_ann_file, d.eval_image_dir = args.ann_file, args.image_dir
  elif args.coco_dir:
    d.source, d.coco_dir = 'coco_dir', args.coco_dir
  elif args.tfds:
    d.source, d.tfds_name = 'tfds', args.tfds
    if args.tfds_data_dir:
      d.tfds_data_dir = args.tfds_data_dir
  if args.num_workers is not None:
    d.num_workers = args.num_workers
  return args.split or d.eval_split


def _open_split(parser, args, config, split: str):
  """(source, image files missing at start-up); refused when files are
  missing (without --skip-bad-images) or the split is empty."""
  source_name = config.data.source
  try:
    source = build_dataset(config, split)
  except (FileNotFoundError, ValueError, OSError) as e:
    cli.fail(parser, f'cannot open the {source_name} {split!r} split: {e}')
  missing = _missing_at_start(source)
  if missing and not args.skip_bad_images:
    cli.fail(parser, f'{len(missing)} image files of the {split!r} split are '
             f'missing (first: {missing[0]}); --skip-bad-images evaluates the '
             'others and records the missing ones')
  if len(source) == 0:
    cli.fail(parser, f'the {source_name} {split!r} split has no image to '
             'evaluate')
  return source, missing


def _devices(parser, args) -> list:
  """Every process's devices (the batch spans all hosts), or the first
  --devices of a single process."""
  devices = jax.devices()
  if args.devices:
    if jax.process_count() > 1:
      cli.fail(parser, '--devices is for single-process runs')
    if args.devices > len(devices):
      cli.fail(parser, f'--devices {args.devices}: only {len(devices)} local '
                   'devices')
    devices = devices[:args.devices]
  return devices


def _write_results(args, metrics: dict, dets: list, *, dropped: list,
                   missing: list) -> None:
  """metrics.json and detections.json (process 0), and what was dropped."""
  if jax.process_index() != 0:
    return
  os.makedirs(args.out, exist_ok=True)
  write_text(os.path.join(args.out, 'detections.json'), json.dumps(dets))
  write_text(os.path.join(args.out, 'metrics.json'),
             json.dumps(metrics, indent=1))
  print(f'wrote {args.out}/metrics.json and {args.out}/detections.json '
        f'({len(dets)} detections)', file=sys.stderr)
  for image_id in dropped:
    print(f'dropped image id {image_id}: could not be read', file=sys.stderr)
  for name in missing:
    print(f'dropped image {name}: missing at start-up', file=sys.stderr)
  if dropped or missing:
    print(f'{len(dropped) + len(missing)} images dropped, '
          f'{metrics["images_evaluated"]} evaluated', file=sys.stderr)


def main(argv=None) -> dict:
  parser = _parser()
  args, overrides = cli.parse_args(parser, argv)
  enable_compilation_cache()
  _check_args(parser, args)
  variables, config = _load_model(parser, args, overrides)
  split = _data_from_flags(config, args)
  source, missing = _open_split(parser, args, config, split)
  devices = _devices(parser, args)
  mesh = make_mesh(config, devices)
  batch = int(args.batch_size or config.eval.batch_size)
  it = make_eval_iterator(config, batch_size=batch, dataset=source,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
  metrics, dets = evaluate_model(jit_detect_fn(config), variables, it,
                                 mesh=mesh,
                                 config=config,
                                 progress=not args.no_progress,
                                 max_images=args.max_images)
  dropped = list(metrics.pop('dropped_image_ids', []))
  metrics.pop('image_ids', None)  # the detections name them
  metrics.update(images_evaluated=int(metrics['num_images']),
                 images_dropped=len(dropped) + len(missing),
                 dropped_image_ids=dropped, missing_files=missing,
                 strict=not args.skip_bad_images)
  metrics.update(config=str(config.name),
                 weights=args.weights or 'random-init', split=split,
                 source=str(config.data.source), batch_size=batch,
                 num_devices=len(devices),
                 device_kind=devices[0].device_kind,
                 date=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  _write_results(args, metrics, dets, dropped=dropped, missing=missing)
  if metrics['images_evaluated'] == 0:
    cli.fail(parser, f'no image of the {split!r} split could be evaluated; '
             f'the metrics in {args.out} are empty')
  if dropped and not args.skip_bad_images:
    cli.fail(parser, f'{len(dropped)} images could not be read (ids '
             f'{", ".join(map(str, dropped[:5]))}); metrics.json in '
             f'{args.out} covers the other {metrics["images_evaluated"]} and '
             'records them (--skip-bad-images accepts that with exit 0)')
  return metrics


if __name__ == '__main__':
  main()
