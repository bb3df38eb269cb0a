"""The exported artifacts beside the Detector on every fixture model.

    python benchmarks/export_parity.py [--out DIR] [--models tiny,swin,...]

For each model (the tiny fixture, a 5-level 20-class model, tiny_swin, and
tiny with 1 and 365 classes; the last four with random weights from
``init_variables`` at seed 0) it exports model.jax and model.onnx with a
dynamic batch on a 128 x 160 canvas (``serve.export.export``) and runs the
Detector, model.jax and model.onnx on three images (the package's sample
image, a half-size copy and a third-by-quarter copy), each alone (batch 1)
and all three in one batch.  The reference for every row is the Detector
on each image alone.  Prints a markdown table (the one in
benchmarks/RESULTS.md, "Export") and one JSON line per row.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import cv2
import jax
import numpy as np

from ddq_jax.config import load_config
from ddq_jax.data.transforms import read_image
from ddq_jax.io.conversion.weights_io import save_converted
from ddq_jax.model.detector import build_model
from ddq_jax.model.variables import init_variables
from ddq_jax.serve import api, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')
SAMPLE = os.path.join(os.path.dirname(api.__file__), 'assets', 'sample.jpg')
CANVAS = (128, 160)
# name -> (config name, overrides, fixture checkpoint or None for random)
MODELS = {
    'tiny': ('tiny', {}, os.path.join(DATA, 'tiny', 'checkpoint.pth')),
    '5level_20cls': ('tiny', {'num_levels': 5, 'num_classes': 20,
                              'backbone.out_indices': (0, 1, 2, 3)}, None),
    'swin': ('tiny_swin', {}, os.path.join(DATA, 'tiny_swin',
                                           'checkpoint.pth')),
    '1cls': ('tiny', {'num_classes': 1}, None),
    '365cls': ('tiny', {'num_classes': 365}, None),
}


def weights_for(name: str, workdir: str):
  """(weights path, config) of a model of MODELS."""
  cfg_name, overrides, path = MODELS[name]
  config = load_config(cfg_name, overrides)
  if path is None:
    model = build_model(config)
    variables = jax.jit(lambda k: init_variables(model, config, k))(
        jax.random.key(0))
    path = os.path.join(workdir, f'{name}_weights')
    save_converted(path, jax.device_get(variables), config)
  return path, config


def samples(det):
  rgb = read_image(SAMPLE)
  h, w = rgb.shape[:2]
  return [det.prepare(x) for x in (rgb, cv2.resize(rgb, (w // 2, h // 2)),
                                   cv2.resize(rgb, (w // 3, h // 4)))]


def errors(got, want, rows):
  """(max box error px, max score error, labels equal / total) of rows
  ``rows`` of ``got`` ([boxes, scores, labels]) against ``want`` (one
  ``Detections`` of batch 1 per row)."""
  box = max(float(np.abs(got[0][j] - w.boxes[0]).max())
            for j, w in zip(rows, want))
  score = max(float(np.abs(got[1][j] - w.scores[0]).max())
              for j, w in zip(rows, want))
  equal = sum(int((got[2][j] == w.labels[0]).sum()) for j, w in
              zip(rows, want))
  total = sum(int(w.labels[0].size) for w in want)
  finite = all(np.isfinite(got[0][j]).all() for j in rows)
  return box if finite else float('nan'), score, equal / total


def timed(fn, *a, **kw):
  t = time.perf_counter()
  out = fn(*a, **kw)
  return out, time.perf_counter() - t


def measure(name: str, workdir: str) -> list[dict]:
  weights, config = weights_for(name, workdir)
  out = os.path.join(workdir, name)
  report = export.export(weights=weights, out=out, canvas=CANVAS,
                         config=config, log=lambda *a: None)
  det, load_det = timed(api.Detector.load, weights, config=config)
  one = api.Detector(det.variables, det.config, batch_size=1)
  three = api.Detector(det.variables, det.config, batch_size=3)
  s = samples(det)
  alone = [api.canvas_batch([x], CANVAS, batch=1) for x in s]
  together = api.canvas_batch(s, CANVAS, batch=3)
  want = [one.run(*a) for a in alone]
  runners = export.load_runners(out)
  loads = {key: _load_one(out, key) for key in runners}
  rows = []

  def detector(*a):
    d = (one if a[0].shape[0] == 1 else three).run(*a)
    return [d.boxes, d.scores, d.labels]

  arts = dict(Detector=detector, **runners)
  for art, run in arts.items():
    run(*together)  # compile / warm up
    b1 = [run(*a) for a in alone]
    e1 = [errors(g, [w], [0]) for g, w in zip(b1, want)]
    got3, call3 = timed(run, *together)
    e3 = errors(got3, want, [0, 1, 2])
    if art == 'Detector':
      size, exp_s, load_s = None, None, load_det
    else:
      size = report['jax_bytes' if art == 'model.jax' else 'onnx_bytes']
      exp_s = report['jax_export_s' if art == 'model.jax'
                     else 'onnx_export_s']
      load_s = loads[art]
    rows.append(dict(
        model=name, artifact=art,
        box1=max(e[0] for e in e1), score1=max(e[1] for e in e1),
        labels1=min(e[2] for e in e1), box3=e3[0], score3=e3[1],
        labels3=e3[2], export_s=exp_s, bytes=size, load_s=load_s,
        call3_s=call3))
  return rows


def _load_one(out: str, key: str) -> float:
  """Seconds to load one artifact (deserialize / InferenceSession)."""
  t = time.perf_counter()
  if key == 'model.jax':
    with open(os.path.join(out, 'model.jax'), 'rb') as f:
      jax.export.deserialize(bytearray(f.read()))
  else:
    import onnxruntime as ort  # optional: ddq-jax[export]
    ort.InferenceSession(os.path.join(out, 'model.onnx'),
                         providers=['CPUExecutionProvider'])
  return time.perf_counter() - t


def _fmt(v, spec):
  return '-' if v is None else format(v, spec)


def table(rows) -> str:
  head = ('| model | artifact | batch 1: box px / score / labels equal | '
          'dynamic batch of 3: box px / score / labels equal | export s | '
          'size MiB | load s | call, batch 3 (s) |\n|---|---|---|---|---|---|'
          '---|---|')
  lines = [head]
  for r in rows:
    lines.append(
        f'| {r["model"]} | {r["artifact"]} | {r["box1"]:.1e} / '
        f'{r["score1"]:.1e} / {r["labels1"]:.0%} | {r["box3"]:.1e} / '
        f'{r["score3"]:.1e} / {r["labels3"]:.0%} | '
        f'{_fmt(r["export_s"], ".1f")} | '
        f'{_fmt(None if r["bytes"] is None else r["bytes"] / 2**20, ".1f")}'
        f' | {r["load_s"]:.2f} | {r["call3_s"]:.2f} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=None,
                      help='where the exports go (default: a temporary '
                      'directory, removed)')
  parser.add_argument('--models', default=','.join(MODELS),
                      help=f'comma-separated subset of {",".join(MODELS)}')
  args = parser.parse_args(argv)
  names = [n for n in args.models.split(',') if n]
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    parser.error(f'--models: unknown {unknown}; expected {list(MODELS)}')
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.out or tmp
    for name in names:
      for r in measure(name, workdir):
        print(json.dumps(r), flush=True)
        rows.append(r)
  print(table(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
