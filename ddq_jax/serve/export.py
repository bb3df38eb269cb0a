"""Export a detector as one self-contained program: jax.export and ONNX.

    python -m ddq_jax export --weights WEIGHTS --out DIR --canvas H W
        [--batch dynamic|N] [--format jax|onnx|both] [--dtype float32|bfloat16]
        [--config PATH|NAME] [--config.KEY=VALUE ...] [--check IMG ...]

WEIGHTS: a converted weights directory, an mmdetection .pth or a train.py
workdir.  DIR receives

  model.jax       jax.export.Exported.serialize() of
                  (images, image_sizes, scale_factors) -> (boxes, scores,
                  labels), lowered for cpu and cuda (and tpu);
  model.onnx      the same function through jax2onnx (--format onnx|both),
                  one image at a time in an ONNX Loop over the batch
                  (``serve.onnx_export``);
  signature.json  shapes, dtypes, class names, the test-time resize rule;
  README.md       how to load both and prepare an input (numpy + OpenCV).

Inputs: images uint8 (N, H, W, 3) RGB, each image resized by the test-time
resize and placed at the top-left of the canvas (zeros elsewhere);
image_sizes int32 (N, 2) its (h, w) there; scale_factors float32 (N, 2) the
(w, h) scale from the original image.  Outputs: boxes float32 (N, K, 4) xyxy
in original pixels, scores float32 (N, K) (0 for empty slots), labels int32
(N, K); K = max_per_img.  H, W are static (--canvas).  N is dynamic by
default (--batch dynamic): a symbolic dimension 'batch' in model.jax
(``jax.export.symbolic_shape``), ``dim_param`` 'batch' in model.onnx and
"batch" in signature.json's shapes, so one artifact takes any number of
images; --batch N fixes it.  Padding invariance is on, so an image's
detections do not depend on its batch mates.  Normalisation, the padding
mask, the model and the post-processing are inside; the weights are
constants of the program.  It is the program ``evaluate`` measures
(``serve.detect``).

Everything is validated before DIR is created (the weights against the
model of the config, the canvas against the test-time resize, the ONNX
tools for --format onnx|both); the artifact set is written into a
temporary directory beside DIR and renamed into place, so DIR holds one
complete export or none.  A DIR holding anything but a previous export is
refused.  --check IMG ... then runs the fresh artifacts next to the
Detector on those images (each alone and, with a dynamic batch, all in one
batch) and exits 1 with one line per difference.  ONNX needs (jax2onnx
pins an older orbax-checkpoint than training uses, so it is installed
without its dependencies):

  pip install "ddq-jax[export]" && pip install --no-deps "jax2onnx==0.17.1"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax import cli
from ddq_jax.io.outputs import check_out_dir, publish_dir, temporary_dir
from ddq_jax.serve.api import Detector, canvas_batch
from ddq_jax.serve.artifact_docs import BATCH_NAME, readme, signature
from ddq_jax.serve.detect import make_detect_fn
from ddq_jax.serve.onnx_export import (INPUT_NAMES, ONNX_INSTALL,
                                       OUTPUT_NAMES, check_onnx_tools,
                                       export_onnx)

PLATFORMS = ('cpu', 'cuda', 'tpu')
ARTIFACTS = ('model.jax', 'model.onnx', 'signature.json', 'README.md')
__all__ = ['export', 'check_artifacts', 'main', 'INPUT_NAMES',
           'OUTPUT_NAMES', 'ONNX_INSTALL', 'BATCH_NAME']


def parse_batch(value) -> Optional[int]:
  """--batch: 'dynamic' (or None) -> None; a positive int (or its text) ->
  that int; anything else a ValueError naming it."""
  if value is None or value == 'dynamic':
    return None
  try:
    n = int(value)
  except (TypeError, ValueError):
    n = 0
  if n < 1 or isinstance(value, bool):
    raise ValueError(f"--batch {value!r}: expected 'dynamic' or a positive "
                     'number of images')
  return n


def canvas_fits_some_image(canvas, test_scale) -> bool:
  """Whether any image, resized by the test-time rule, fits ``canvas``
  (H, W): the rule takes the long side to max(test_scale) or the short side
  to min(test_scale), so a canvas fits one iff a side reaches the long
  limit or both reach the short one."""
  h, w = (int(v) for v in canvas)
  lo, hi = min(test_scale), max(test_scale)
  return max(h, w) >= hi or min(h, w) >= lo


def check_out(out: str) -> None:
  """``out`` may be new, empty or a previous export (ValueError naming it
  otherwise); its parent must exist."""
  check_out_dir(out, (), flag='--out')
  if os.path.isdir(out):
    other = sorted(set(os.listdir(out)) - set(ARTIFACTS))
    if other:
      raise ValueError(f'--out {out}: holds {len(other)} entries that are not '
                       f'an export ({", ".join(other[:3])}); nothing was '
                       'written.  Choose a new or empty directory')


def serving_fn(detect, variables, *, opaque_weights: bool = False):
  """(images, image_sizes, scale_factors) -> (boxes, scores, labels) with
  ``variables`` closed over (``detect.make_detect_fn``'s function).

  ``opaque_weights``: the weights pass an ``optimization_barrier`` first,
  so XLA compiles the program as it compiles the Detector's (weights as
  values it cannot look into).  model.jax needs it: with the weights as
  visible constants, XLA:CPU (jax 0.10.2) compiled the scanned decoder of
  a 5-level 20-class model wrong in 5 of 5 fresh compiles at batch 1 (NaN
  hidden states from the first layer on, or boxes 180 px off), and right
  with the barrier or the layers unrolled."""
  def serve(images, image_sizes, scale_factors):
    v = (jax.lax.optimization_barrier(variables) if opaque_weights
         else variables)
    d = detect(v, images, image_sizes, scale_factors)
    return d.boxes, d.scores, d.labels
  return serve



def input_specs(*, batch: Optional[int], canvas) -> tuple:
  """ShapeDtypeStructs of (images (N, H, W, 3) uint8, image_sizes (N, 2)
  int32, scale_factors (N, 2) float32); N = ``batch``, or the symbolic
  dimension BATCH_NAME when None."""
  h, w = (int(v) for v in canvas)
  n = (jax.export.symbolic_shape(BATCH_NAME)[0] if batch is None
       else int(batch))
  return (jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8),
          jax.ShapeDtypeStruct((n, 2), jnp.int32),
          jax.ShapeDtypeStruct((n, 2), jnp.float32))


def export_jax(serve, specs, *, platforms=PLATFORMS) -> tuple[bytes, list]:
  """(serialized ``jax.export`` of ``serve``, the platforms it has):
  platforms this jax cannot lower for are dropped from the end."""
  plats = list(platforms)
  while True:
    try:
      exp = jax.export.export(jax.jit(serve), platforms=plats)(*specs)
      return bytes(exp.serialize()), plats
    except Exception:  # pylint: disable=broad-except
      if len(plats) <= 1:
        raise
      plats = plats[:-1]



def output_shapes(*, batch: Optional[int], k: int) -> list:
  n = BATCH_NAME if batch is None else int(batch)
  return [(n, k, 4), (n, k), (n, k)]


def export(*, weights: str, out: str, canvas, batch='dynamic',
           fmt: str = 'both', dtype: str = 'float32', config=None,
           overrides=None, platforms=PLATFORMS, check=(), log=print) -> dict:
  """Writes DIR/{model.jax, model.onnx, signature.json, README.md} as one
  set (temporary directory, then a rename); returns the timings, sizes and
  ONNX op counts, and with ``check`` (image paths) the differences
  ``check_artifacts`` finds.  ``batch``: 'dynamic' or N.  Every input is
  checked before DIR is created."""
  if fmt not in ('jax', 'onnx', 'both'):
    raise ValueError(f"--format {fmt!r}: expected 'jax', 'onnx' or 'both'")
  n = parse_batch(batch)
  if len(canvas) != 2 or min(int(v) for v in canvas) < 1:
    raise ValueError(f'--canvas {canvas}: expected a positive (H, W)')
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"--dtype {dtype!r}: expected 'float32' or 'bfloat16'")
  check_out(out)
  if not os.path.exists(weights):
    raise FileNotFoundError(f'--weights {weights}: no such file or directory')
  if fmt in ('onnx', 'both'):
    check_onnx_tools()
  missing = [p for p in check if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'--check {missing[0]}: no such file '
                            f'({len(missing)} of {len(check)} missing)')
  report: dict = {'batch': 'dynamic' if n is None else n}
  t = time.perf_counter()
  det = Detector.load(weights, config=config, overrides=overrides,
                      dtype=dtype)
  report['load_s'] = time.perf_counter() - t
  scale = tuple(int(v) for v in det.config.data.test_scale)
  if not canvas_fits_some_image(canvas, scale):
    raise ValueError(
        f'--canvas {canvas[0]} {canvas[1]}: no image fits it after the '
        f'test-time resize (test_scale {scale} takes the long side to '
        f'{max(scale)} or the short side to {min(scale)}); use a side >= '
        f'{max(scale)} or both sides >= {min(scale)}, e.g. --canvas '
        f'{min(scale)} {max(scale)}')
  specs = input_specs(batch=n, canvas=canvas)
  k = int(det.config.max_per_img)
  detect = make_detect_fn(det.config, dtype=dtype)
  serve = serving_fn(detect, det.variables)
  with temporary_dir(out) as tmp:
    plats = []
    if fmt in ('jax', 'both'):
      t = time.perf_counter()
      data, plats = export_jax(serving_fn(detect, det.variables,
                                          opaque_weights=True),
                               specs, platforms=platforms)
      _write_bytes(os.path.join(tmp, 'model.jax'), data)
      report['jax_export_s'] = time.perf_counter() - t
      report['jax_bytes'] = len(data)
      report['platforms'] = plats
      log(f'model.jax: {len(data) / 2**20:.1f} MiB for {plats} in '
          f'{report["jax_export_s"]:.1f} s')
    if fmt in ('onnx', 'both'):
      t = time.perf_counter()
      path = os.path.join(tmp, 'model.onnx')
      report.update(export_onnx(serve, specs, path, batch_name=BATCH_NAME,
                                out_shapes=output_shapes(batch=n, k=k)))
      report['onnx_export_s'] = time.perf_counter() - t
      report['onnx_bytes'] = os.path.getsize(path)
      log(f'model.onnx: {report["onnx_bytes"] / 2**20:.1f} MiB, '
          f'{sum(report["ops"].values())} nodes of {len(report["ops"])} op '
          f'types in {report["onnx_export_s"]:.1f} s')
    sig = signature(det.config, batch=n, canvas=canvas, dtype=dtype,
                    platforms=plats, class_names=det.class_names)
    _write_bytes(os.path.join(tmp, 'signature.json'),
                 (json.dumps(sig, indent=1) + '\n').encode())
    _write_bytes(os.path.join(tmp, 'README.md'),
                 readme(batch=n, canvas=canvas, k=k).encode())
    publish_dir(tmp, out, ARTIFACTS)
  if check:
    ref = Detector(det.variables, det.config, dtype=dtype, batch_size=1)
    diffs = check_artifacts(out, ref, list(check), canvas=canvas, batch=n)
    report['check'] = dict(images=len(check), differences=diffs)
  return report


# Beyond these an artifact differs from the Detector (issue 21).
CHECK_BOX_PX, CHECK_SCORE = 1e-2, 1e-4


def load_runners(out: str) -> dict:
  """{'model.jax' | 'model.onnx': fn(images, image_sizes, scale_factors) ->
  [boxes, scores, labels] numpy} for the artifacts present in ``out``."""
  runners = {}
  if os.path.exists(os.path.join(out, 'model.jax')):
    with open(os.path.join(out, 'model.jax'), 'rb') as f:
      exp = jax.export.deserialize(bytearray(f.read()))
    runners['model.jax'] = lambda *a: [np.asarray(x) for x in exp.call(*a)]
  if os.path.exists(os.path.join(out, 'model.onnx')):
    import onnxruntime as ort  # optional: ddq-jax[export]
    sess = ort.InferenceSession(os.path.join(out, 'model.onnx'),
                                providers=['CPUExecutionProvider'])
    runners['model.onnx'] = lambda *a: sess.run(
        None, dict(zip(INPUT_NAMES, a)))
  return runners


def difference(got, want, j: int, i: int = 0) -> Optional[str]:
  """None when row ``j`` of ``got`` ([boxes, scores, labels]) agrees with row
  ``i`` of ``want`` (``Detections``): labels equal, boxes within
  CHECK_BOX_PX, scores within CHECK_SCORE, all finite; else a description."""
  boxes, scores, labels = got
  lab = int((labels[j] != want.labels[i]).sum())
  box = float(np.abs(boxes[j] - want.boxes[i]).max())
  score = float(np.abs(scores[j] - want.scores[i]).max())
  if lab or not box <= CHECK_BOX_PX or not score <= CHECK_SCORE:
    return (f'{lab} of {labels.shape[1]} labels differ, box error {box:.3g} '
            f'px, score error {score:.3g} vs the Detector')
  return None


def check_artifacts(out: str, detector, paths, *, canvas,
                    batch: Optional[int] = None,
                    runners: Optional[dict] = None) -> list[str]:
  """Runs the artifacts in ``out`` next to ``detector`` on the images
  ``paths``.  The Detector runs each image alone; the artifacts run each
  image alone and all of them in one batch (``batch`` None: dynamic), or
  in batches of ``batch`` padded with empty canvases.  Returns one line
  per image, artifact and batch that differs (a label, a box by more than
  CHECK_BOX_PX, a score by more than CHECK_SCORE, or anything not finite),
  [] when all agree.  ``runners``: default ``load_runners(out)``."""
  runners = load_runners(out) if runners is None else runners
  samples = [detector.prepare(p, i) for i, p in enumerate(paths)]
  for p, s in zip(paths, samples):
    if s['img_shape'][0] > canvas[0] or s['img_shape'][1] > canvas[1]:
      raise ValueError(f'--check {p}: resized to {tuple(s["img_shape"])}, '
                       f'larger than the canvas {tuple(canvas)}')
  canvas = tuple(int(v) for v in canvas)
  want = [detector.run(*canvas_batch([s], canvas, batch=detector.batch_size))
          for s in samples]
  if batch is None:
    groups = [[i] for i in range(len(samples))]
    if len(samples) > 1:
      groups.append(list(range(len(samples))))
  else:
    groups = [list(range(len(samples)))[a:a + batch]
              for a in range(0, len(samples), batch)]
  diffs = []
  for group in groups:
    n = len(group) if batch is None else batch
    inputs = canvas_batch([samples[i] for i in group], canvas, batch=n)
    for name, run in runners.items():
      got = run(*inputs)
      for j, i in enumerate(group):
        line = difference(got, want[i], j)
        if line:
          diffs.append(f'{name} {paths[i]} (batch of {n}): {line}')
  return diffs


def _write_bytes(path: str, data: bytes) -> None:
  """Write via a temporary file and rename (no half-written artifact)."""
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ddq_jax export', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--weights', required=True,
                      help='converted weights directory, mmdetection .pth or '
                      'train.py workdir')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--batch', default='dynamic',
                      help="'dynamic' (default: any number of images per "
                      "call) or a fixed batch size N")
  parser.add_argument('--canvas', type=int, nargs=2, required=True,
                      metavar=('H', 'W'), help='static canvas height, width')
  parser.add_argument('--format', default='both',
                      choices=('jax', 'onnx', 'both'),
                      help='default both; onnx needs: ' + ONNX_INSTALL)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--platforms', default=','.join(PLATFORMS),
                      help='jax.export platforms (default cpu,cuda,tpu; '
                      'ones this jax cannot lower for are dropped)')
  parser.add_argument('--check', nargs='+', default=(), metavar='IMG',
                      help='after the export, run the artifacts next to '
                      'the Detector on these images; exit 1 with one line '
                      'per difference')
  cli.add_config_argument(parser, help_text='default: the one stored with '
                          'the weights.')
  args, overrides = cli.parse_args(parser, argv)
  config = (cli.load_or_fail(parser, args.config, overrides)
            if args.config else None)
  try:
    report = export(weights=args.weights, out=args.out, batch=args.batch,
                    canvas=args.canvas, fmt=args.format, dtype=args.dtype,
                    config=config, overrides=overrides,
                    platforms=tuple(p for p in args.platforms.split(',') if p),
                    check=tuple(args.check))
  except (ValueError, TypeError, FileNotFoundError, OSError,
          ImportError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  print(json.dumps({k: v for k, v in report.items() if k != 'ops'}))
  if 'check' not in report:
    return 0
  diffs = report['check']['differences']
  for line in diffs:
    print(f'error: --check: {line}', file=sys.stderr)
  if diffs:
    print(f'error: --check failed: the exported artifacts differ from the '
          f'Detector ({len(diffs)} lines above) on {len(args.check)} images',
          file=sys.stderr)
    return 1
  print(f'--check: the artifacts agree with the Detector on '
        f'{len(args.check)} images', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
