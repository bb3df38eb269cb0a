"""Export a detector as one self-contained program: jax.export and ONNX.

    python -m ddq_jax export --weights WEIGHTS --out DIR --batch N
        --canvas H W [--format jax|onnx|both] [--dtype float32|bfloat16]
        [--config PATH|NAME] [--config.KEY=VALUE ...] [--check IMG ...]

WEIGHTS: a converted weights directory, an mmdetection .pth or a train.py
workdir.  DIR receives

  model.jax       jax.export.Exported.serialize() of
                  (images, image_sizes, scale_factors) -> (boxes, scores,
                  labels), lowered for cpu and cuda (and tpu);
  model.onnx      the same function through jax2onnx (--format onnx|both);
  signature.json  shapes, dtypes, class names, the test-time resize rule;
  README.md       how to load both and prepare an input (numpy + OpenCV).

Inputs: images uint8 (N, H, W, 3) RGB, each image resized by the test-time
resize and placed at the top-left of the canvas (zeros elsewhere);
image_sizes int32 (N, 2) its (h, w) there; scale_factors float32 (N, 2) the
(w, h) scale from the original image.  Outputs: boxes float32 (N, K, 4) xyxy
in original pixels, scores float32 (N, K) (0 for empty slots), labels int32
(N, K); K = max_per_img.  Normalisation, the padding mask, the model and the
post-processing are inside; the weights are constants of the program.  It
is the program ``evaluate`` measures (``serve.detect``).

Everything is validated before DIR is created (the weights against the
model of the config, the canvas against the test-time resize, the ONNX
tools for --format onnx|both); the artifact set is written into a
temporary directory beside DIR and renamed into place, so DIR holds one
complete export or none.  A DIR holding anything but a previous export is
refused.  ONNX needs (jax2onnx pins an older orbax-checkpoint than
training uses, so it is installed without its dependencies):

  pip install "ddq-jax[export]" && pip install --no-deps "jax2onnx==0.17.1"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax import cli
from ddq_jax.io.outputs import check_out_dir, publish_dir, temporary_dir
from ddq_jax.ops.nms import auto_method
from ddq_jax.serve.api import Detector
from ddq_jax.serve.detect import make_detect_fn
from ddq_jax.serve.onnx_graph import fix_graph

INPUT_NAMES = ('images', 'image_sizes', 'scale_factors')
OUTPUT_NAMES = ('boxes', 'scores', 'labels')
PLATFORMS = ('cpu', 'cuda', 'tpu')
# The ONNX graph runs the NMS as a while loop of dense (N, N) steps (a
# fori_loop under vmap has no lowering in jax2onnx).
ONNX_NMS_METHOD = 'fixed_point'
# The one install that makes --format onnx|both work (see pyproject.toml).
ONNX_INSTALL = ('pip install "ddq-jax[export]" && pip install --no-deps '
                '"jax2onnx==0.17.1"')
ARTIFACTS = ('model.jax', 'model.onnx', 'signature.json', 'README.md')


def check_onnx_tools() -> None:
  """ImportError naming ``ONNX_INSTALL`` when jax2onnx / onnx are absent."""
  missing = []
  for module in ('onnx', 'jax2onnx'):
    try:
      __import__(module)
    except ImportError:
      missing.append(module)
  if missing:
    raise ImportError(f'ONNX export (--format onnx|both) needs '
                      f'{" and ".join(missing)}: {ONNX_INSTALL}; or pass '
                      '--format jax')


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


def serving_fn(detect, variables):
  """(images, image_sizes, scale_factors) -> (boxes, scores, labels) with
  ``variables`` closed over (``detect.make_detect_fn``'s function)."""
  def serve(images, image_sizes, scale_factors):
    d = detect(variables, images, image_sizes, scale_factors)
    return d.boxes, d.scores, d.labels
  return serve


def input_specs(*, batch: int, canvas):
  h, w = (int(v) for v in canvas)
  return (jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8),
          jax.ShapeDtypeStruct((batch, 2), jnp.int32),
          jax.ShapeDtypeStruct((batch, 2), jnp.float32))


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


def export_onnx(serve, specs, path: str) -> dict:
  """Writes ``path`` (jax2onnx); returns {'ops': {op_type: count}}."""
  try:
    from jax2onnx import to_onnx  # optional: ddq-jax[export]
    import onnx  # optional: ddq-jax[export]
  except ImportError as e:
    raise ImportError(f'ONNX export needs jax2onnx and onnx: {ONNX_INSTALL}'
                      ) from e
  # Trace with plain JAX first: the converter then sees lax primitives only
  # (vmap already applied), not its patched jnp / flax functions.
  # (A fresh function: jax caches traces by function, and an earlier
  # export of ``serve`` traced the default NMS method.)
  with auto_method(ONNX_NMS_METHOD):
    closed = jax.make_jaxpr(lambda *a: serve(*a))(*specs)

  def replay(*args):
    return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)

  model = to_onnx(replay, list(specs), model_name='ddq_detr',
                  input_names=list(INPUT_NAMES),
                  output_names=list(OUTPUT_NAMES))
  model = onnx.shape_inference.infer_shapes(model)
  fixes = fix_graph(model.graph)
  onnx.save(model, path)
  ops: dict[str, int] = {}
  for node in model.graph.node:
    ops[node.op_type] = ops.get(node.op_type, 0) + 1
  return {'ops': dict(sorted(ops.items(), key=lambda kv: -kv[1])),
          'onnx_fixes': fixes,
          'opset': [dict(domain=o.domain, version=o.version)
                    for o in model.opset_import]}


def signature(config, *, batch: int, canvas, dtype: str, platforms,
              class_names) -> dict:
  h, w = (int(v) for v in canvas)
  k = int(config.max_per_img)
  return dict(
      inputs=[dict(name='images', dtype='uint8', shape=[batch, h, w, 3],
                   layout='NHWC RGB, resized image at the top-left, zeros '
                   'elsewhere'),
              dict(name='image_sizes', dtype='int32', shape=[batch, 2],
                   meaning='(h, w) of each resized image on the canvas'),
              dict(name='scale_factors', dtype='float32', shape=[batch, 2],
                   meaning='(w, h) = (new_w / orig_w, new_h / orig_h)')],
      outputs=[dict(name='boxes', dtype='float32', shape=[batch, k, 4],
                    meaning='xyxy in original-image pixels'),
               dict(name='scores', dtype='float32', shape=[batch, k],
                    meaning='sigmoid scores, best first; 0 for empty slots'),
               dict(name='labels', dtype='int32', shape=[batch, k],
                    meaning='index into class_names')],
      resize=dict(
          rule='keep ratio: factor = min(max(test_scale) / max(h, w), '
          'min(test_scale) / min(h, w)); new_w = max(1, int(w * factor + '
          '0.5)), new_h = max(1, int(h * factor + 0.5)); '
          'cv2.resize(INTER_LINEAR) of the '
          'RGB image',
          test_scale=[int(v) for v in config.data.test_scale]),
      normalisation=dict(mean=[float(v) for v in config.data.mean],
                         std=[float(v) for v in config.data.std],
                         inside=True),
      canvas=[h, w], batch=batch, max_per_img=k, dtype=dtype,
      platforms=list(platforms), class_names=list(class_names),
      num_classes=int(config.num_classes))


README = '''# DDQ-DETR, exported

Inputs are a batch of {batch} images on a {h} x {w} canvas; outputs are the
top {k} detections per image.  `signature.json` has the shapes, dtypes and
class names.

## Preparing an input (numpy + OpenCV)

```python
import json, cv2, numpy as np

sig = json.load(open('signature.json'))
H, W = sig['canvas']
N = sig['batch']
scale = sig['resize']['test_scale']

def prepare(path):
    """(image on the canvas, (h, w), (w_scale, h_scale)) of one file."""
    rgb = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    nw, nh = max(1, int(w * f + 0.5)), max(1, int(h * f + 0.5))
    assert nh <= H and nw <= W, 'image does not fit the canvas'
    canvas = np.zeros((H, W, 3), np.uint8)
    canvas[:nh, :nw] = cv2.resize(rgb, (nw, nh),
                                  interpolation=cv2.INTER_LINEAR)
    return canvas, (nh, nw), (nw / w, nh / h)

paths = ['a.jpg']                       # up to N; pad the batch with zeros
images = np.zeros((N, H, W, 3), np.uint8)
image_sizes = np.tile(np.array([H, W], np.int32), (N, 1))
scale_factors = np.ones((N, 2), np.float32)
for i, p in enumerate(paths):
    images[i], image_sizes[i], scale_factors[i] = prepare(p)
```

## Running model.jax (needs only jax, not ddq_jax)

```python
import jax
exported = jax.export.deserialize(open('model.jax', 'rb').read())
boxes, scores, labels = exported.call(images, image_sizes, scale_factors)
```

## Running model.onnx (onnxruntime)

```python
import onnxruntime as ort
sess = ort.InferenceSession('model.onnx', providers=['CPUExecutionProvider'])
boxes, scores, labels = sess.run(None, dict(
    images=images, image_sizes=image_sizes, scale_factors=scale_factors))
```

Keep `scores > threshold` (e.g. 0.3); `boxes[i, j]` is `(x1, y1, x2, y2)`
in the original image's pixels; `sig['class_names'][labels[i, j]]` names it.
'''


def export(*, weights: str, out: str, batch: int, canvas, fmt: str = 'both',
           dtype: str = 'float32', config=None, overrides=None,
           platforms=PLATFORMS, check=(), log=print) -> dict:
  """Writes DIR/{model.jax, model.onnx, signature.json, README.md} as one
  set (temporary directory, then a rename); returns the timings, sizes and
  ONNX op counts.  Every input is checked before DIR is created."""
  if fmt not in ('jax', 'onnx', 'both'):
    raise ValueError(f"--format {fmt!r}: expected 'jax', 'onnx' or 'both'")
  if int(batch) < 1 or len(canvas) != 2 or min(int(v) for v in canvas) < 1:
    raise ValueError(f'--batch {batch} --canvas {canvas}: expected a positive '
                     'batch and a positive (H, W)')
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
  report: dict = {}
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
  specs = input_specs(batch=int(batch), canvas=canvas)
  serve = serving_fn(make_detect_fn(det.config, dtype=dtype), det.variables)
  with temporary_dir(out) as tmp:
    plats = []
    if fmt in ('jax', 'both'):
      t = time.perf_counter()
      data, plats = export_jax(serve, specs, platforms=platforms)
      _write_bytes(os.path.join(tmp, 'model.jax'), data)
      report['jax_export_s'] = time.perf_counter() - t
      report['jax_bytes'] = len(data)
      report['platforms'] = plats
      log(f'model.jax: {len(data) / 2**20:.1f} MiB for {plats} in '
          f'{report["jax_export_s"]:.1f} s')
    if fmt in ('onnx', 'both'):
      t = time.perf_counter()
      path = os.path.join(tmp, 'model.onnx')
      report.update(export_onnx(serve, specs, path))
      report['onnx_export_s'] = time.perf_counter() - t
      report['onnx_bytes'] = os.path.getsize(path)
      log(f'model.onnx: {report["onnx_bytes"] / 2**20:.1f} MiB, '
          f'{sum(report["ops"].values())} nodes of {len(report["ops"])} op '
          f'types in {report["onnx_export_s"]:.1f} s')
    sig = signature(det.config, batch=int(batch), canvas=canvas, dtype=dtype,
                    platforms=plats, class_names=det.class_names)
    _write_bytes(os.path.join(tmp, 'signature.json'),
                 (json.dumps(sig, indent=1) + '\n').encode())
    h, w = (int(v) for v in canvas)
    _write_bytes(os.path.join(tmp, 'README.md'), README.format(
        batch=int(batch), h=h, w=w, k=int(det.config.max_per_img)).encode())
    publish_dir(tmp, out, ARTIFACTS)
  if check:
    ref = Detector(det.variables, det.config, dtype=dtype,
                    batch_size=int(batch))
    diffs = check_artifacts(out, ref, list(check), canvas=canvas)
    report['check'] = dict(images=len(check), differences=diffs)
  return report


# Beyond these an artifact differs from the Detector (issue 21).
CHECK_BOX_PX, CHECK_SCORE = 1e-2, 1e-4


def check_artifacts(out: str, detector, paths, *, canvas) -> list[str]:
  """Runs the artifacts in ``out`` next to ``detector`` (its batch size
  is the export's) on the images ``paths``; returns one line per image and
  artifact that differs (a label, a box by more than CHECK_BOX_PX, a score
  by more than CHECK_SCORE, or anything not finite), [] when all agree."""
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
  samples = [detector.prepare(p, i) for i, p in enumerate(paths)]
  for p, s in zip(paths, samples):
    if s['img_shape'][0] > canvas[0] or s['img_shape'][1] > canvas[1]:
      raise ValueError(f'--check {p}: resized to {tuple(s["img_shape"])}, '
                       f'larger than the canvas {tuple(canvas)}')
  diffs, n = [], detector.batch_size
  for start in range(0, len(samples), n):
    chunk = samples[start:start + n]
    inputs = detector._batch(chunk, tuple(canvas))  # pylint: disable=protected-access
    want = detector.run(*inputs)
    for name, run in runners.items():
      boxes, scores, labels = run(*inputs)
      for j in range(len(chunk)):
        lab = int((labels[j] != want.labels[j]).sum())
        box = float(np.abs(boxes[j] - want.boxes[j]).max())
        score = float(np.abs(scores[j] - want.scores[j]).max())
        if lab or not box <= CHECK_BOX_PX or not score <= CHECK_SCORE:
          diffs.append(f'{name} {paths[start + j]}: {lab} of '
                       f'{labels.shape[1]} labels differ, box error '
                       f'{box:.3g} px, score error {score:.3g} vs the '
                       'Detector')
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
  parser.add_argument('--batch', type=int, default=1,
                      help='static batch size N (default 1)')
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
  diffs = report.get('check', {}).get('differences', [])
  for line in diffs:
    print(f'error: {line}', file=sys.stderr)
  return 1 if diffs else 0


if __name__ == '__main__':
  sys.exit(main())
