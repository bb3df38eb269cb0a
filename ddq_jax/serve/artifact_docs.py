"""What an export says about itself: signature.json and README.md
(``serve.export`` writes both beside model.jax / model.onnx)."""
from __future__ import annotations

from typing import Optional, Sequence

# --batch dynamic: the batch dimension's name in model.jax's symbolic shapes,
# model.onnx's dim_param, and signature.json's shapes.
BATCH_NAME = 'batch'


def signature(config, *, batch: Optional[int], canvas: Sequence[int],
              dtype: str, platforms: Sequence[str],
              class_names: Sequence[str]) -> dict:
  """signature.json: inputs and outputs (name, dtype, shape, meaning), the
  resize rule, normalisation, canvas, batch ('dynamic' or N), classes.
  ``batch`` None: the shapes' first entry is BATCH_NAME."""
  h, w = (int(v) for v in canvas)
  k = int(config.max_per_img)
  n = BATCH_NAME if batch is None else int(batch)
  return dict(
      inputs=[dict(name='images', dtype='uint8', shape=[n, h, w, 3],
                   layout='NHWC RGB, resized image at the top-left, zeros '
                   'elsewhere'),
              dict(name='image_sizes', dtype='int32', shape=[n, 2],
                   meaning='(h, w) of each resized image on the canvas'),
              dict(name='scale_factors', dtype='float32', shape=[n, 2],
                   meaning='(w, h) = (new_w / orig_w, new_h / orig_h)')],
      outputs=[dict(name='boxes', dtype='float32', shape=[n, k, 4],
                    meaning='xyxy in original-image pixels'),
               dict(name='scores', dtype='float32', shape=[n, k],
                    meaning='sigmoid scores, best first; 0 for empty slots'),
               dict(name='labels', dtype='int32', shape=[n, k],
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
      canvas=[h, w], batch='dynamic' if batch is None else int(batch),
      batch_independent=True, max_per_img=k, dtype=dtype,
      platforms=list(platforms), class_names=list(class_names),
      num_classes=int(config.num_classes))


_README = '''# DDQ-DETR, exported

Inputs are {batch_text} on a {h} x {w} canvas; outputs are the top {k}
detections per image.  Each image's detections are the same whatever
other images share its batch.  `signature.json` has the shapes, dtypes
and class names.

## Preparing an input (numpy + OpenCV)

```python
import json, cv2, numpy as np

sig = json.load(open('signature.json'))
H, W = sig['canvas']
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

paths = ['a.jpg']
# 'dynamic': any number of images; else exactly N (pad with zero images)
N = len(paths) if sig['batch'] == 'dynamic' else sig['batch']
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


def readme(*, batch: Optional[int], canvas: Sequence[int], k: int) -> str:
  """README.md of an export (``batch`` None: dynamic)."""
  h, w = (int(v) for v in canvas)
  text = ('any number of images (a dynamic batch)' if batch is None
          else f'a batch of exactly {int(batch)} images')
  return _README.format(batch_text=text, h=h, w=w, k=int(k))
