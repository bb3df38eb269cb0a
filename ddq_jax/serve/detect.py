"""The one inference program: uint8 canvases in, detections out.

    detect = jit_detect_fn(config)          # validated inputs, jitted
    dets = detect(variables, images, image_sizes, scale_factors)
    records = detection_records(dets.boxes[0], dets.scores[0],
                                dets.labels[0], keep=dets.valid[0])

Every path from images to detections runs this program: ``evaluate`` (and
the training loop's periodic evaluation), ``predict`` and ``Detector``, the
benchmark's inference mode, and both export formats, which serialise
``make_detect_fn``'s function as it is.  So the COCO AP that evaluation
reports is the AP of the exported program.

Inputs: images (N, H, W, 3) uint8 RGB, each image resized by the test-time
resize and placed at the top-left of the canvas; image_sizes (N, 2) its
(h, w) there; scale_factors (N, 2) the (w, h) scale over the original
image.  Inside: uint8 -> float32, (x - mean) / std rounded like the host's
numpy (``data.transforms.normalize``, one rounding per operation), zero
padding and the padding mask (True outside image_sizes), the model and
``model.detector.postprocess``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.model.detector import build_model, postprocess
from ddq_jax.ops.xla_cpu import exact_divide
from ddq_jax.precision import Precision


def inference_config(config):
  """The config for serving: ``padding_invariant`` on where the config
  has that switch (a copy; ``config`` is not changed)."""
  config = config.copy_and_resolve_references()
  if 'padding_invariant' in config:
    config.padding_invariant = True
  return config


def normalize_canvas(images: jax.Array, image_sizes: jax.Array, *,
                     mean: Sequence[float], std: Sequence[float]
                     ) -> tuple[jax.Array, jax.Array]:
  """(x, pad_mask) of a uint8 canvas batch.

  x (N, H, W, 3) float32: (float(images) - mean) / std inside each image
  and 0 outside; the division is rounded once (``exact_divide``: XLA would
  otherwise multiply by the reciprocal), so x equals the host's
  ``data.transforms.normalize`` bit for bit.  pad_mask (N, H, W) bool:
  True outside image_sizes (N, 2) (h, w).
  """
  _, h, w, _ = images.shape
  image_sizes = image_sizes.astype(jnp.int32)
  ys = jnp.arange(h, dtype=jnp.int32)[None, :, None]
  xs = jnp.arange(w, dtype=jnp.int32)[None, None, :]
  pad_mask = ((ys >= image_sizes[:, 0, None, None])
              | (xs >= image_sizes[:, 1, None, None]))
  x = exact_divide(images.astype(jnp.float32) - np.asarray(mean, np.float32),
                   np.asarray(std, np.float32))
  return jnp.where(pad_mask[..., None], 0.0, x), pad_mask


def make_detect_fn(config, *, dtype: str = 'float32',
                   semantics: Optional[str] = None) -> Callable:
  """``fn(variables, images, image_sizes, scale_factors) -> Detections``.

  The program of the module docstring, pure and not jitted.  ``config``
  is used as given (``inference_config`` turns padding invariance on);
  ``dtype``: 'float32' | 'bfloat16' for the parameters and activations
  (the post-processing runs in float32); ``semantics``: optional override
  of ``config.distinct_mask_semantics``.  Returns
  ``model.outputs.Detections`` (N, K = config.max_per_img).
  """
  precision = Precision(compute_dtype=dtype)
  model = build_model(config)
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  def detect(variables, images, image_sizes, scale_factors):
    x, pad_mask = normalize_canvas(images, image_sizes, mean=mean, std=std)
    if precision.mixed:
      variables = precision.cast(variables)
      x = x.astype(precision.dtype)
    out = model.apply(variables, x, pad_mask, semantics=semantics)
    out = out.replace(cls_logits=out.cls_logits.astype(jnp.float32),
                      boxes=out.boxes.astype(jnp.float32))
    return postprocess(out, img_shapes=image_sizes.astype(jnp.int32),
                       scale_factors=scale_factors.astype(jnp.float32),
                       max_per_img=int(config.max_per_img))

  return detect


def _describe(x) -> str:
  return (f'{type(x).__name__} dtype={getattr(x, "dtype", None)} '
          f'shape={tuple(getattr(x, "shape", ()))}')


def validate_detect_inputs(images, image_sizes, scale_factors) -> None:
  """TypeError / ValueError naming the bad input and what was expected;
  dtypes and shapes only (nothing is copied off a device)."""
  for name, x in (('images', images), ('image_sizes', image_sizes),
                  ('scale_factors', scale_factors)):
    if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
      raise TypeError(f'{name}: expected an array (numpy or jax), got '
                      f'{type(x).__name__}')
  if np.dtype(images.dtype) != np.uint8:
    raise TypeError(f'images: expected dtype uint8 (0..255 RGB canvases), '
                    f'got {_describe(images)}')
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images: expected (N, H, W, 3) RGB, got '
                     f'{_describe(images)}')
  n = images.shape[0]
  for name, x, what in (('image_sizes', image_sizes, '(h, w)'),
                        ('scale_factors', scale_factors, '(w, h)')):
    if tuple(x.shape) != (n, 2):
      raise ValueError(f'{name}: expected shape (N, 2) = {(n, 2)} of {what}, '
                       f'got {_describe(x)}')
    if np.dtype(x.dtype).kind not in 'iuf':
      raise TypeError(f'{name}: expected a numeric dtype, got {_describe(x)}')


def jit_detect_fn(config, *, dtype: str = 'float32',
                  semantics: Optional[str] = None) -> Callable:
  """``make_detect_fn`` jitted, with its inputs checked on the host before
  tracing (``validate_detect_inputs``; variables must be a dict with
  'params').  The returned function has ``jitted`` (the jitted program,
  no checks; ``compilation_cache.compile_count`` reads it)."""
  jitted = jax.jit(make_detect_fn(config, dtype=dtype, semantics=semantics))

  def detect(variables, images, image_sizes, scale_factors):
    if not isinstance(variables, Mapping) or 'params' not in variables:
      raise TypeError("variables: expected a dict with 'params' (and "
                      "'batch_stats'), e.g. the converted checkpoint")
    validate_detect_inputs(images, image_sizes, scale_factors)
    return jitted(variables, images, image_sizes, scale_factors)

  detect.jitted = jitted
  return detect


def detection_records(boxes, scores, labels, *, keep=None, image=None,
                      image_key: str = 'image_id',
                      category_ids: Optional[Sequence[int]] = None,
                      class_names: Optional[Sequence[str]] = None,
                      decimals: Optional[tuple[int, int]] = None
                      ) -> list[dict]:
  """One image's detections as COCO result records, in the given order.

  Args:
    boxes: (M, 4) xyxy in original-image pixels; scores (M,); labels (M,)
      contiguous 0..K-1.
    keep: optional (M,) bool, the detections to write.
    image: the image's id (or file), written under ``image_key`` first.
    category_ids: contiguous label -> the data set's category id
      (detections whose label has none are dropped); default: the label.
    class_names: label -> class name (a sequence or a mapping), written as
      'category_name'.
    decimals: (bbox, score) rounding; default: none (full precision).
  Returns:
    [{image_key, 'category_id', 'category_name', 'bbox': [x, y, w, h]
    (w = x2 - x1), 'score'}], without the keys not asked for.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  ok = np.ones(len(labels), bool) if keep is None else np.asarray(keep, bool)
  ok = ok & (labels >= 0)
  cats = labels
  if category_ids is not None:
    table = np.asarray(list(category_ids), np.int64)
    ok = ok & (labels < len(table))
    cats = table[np.where(ok, labels, 0)]
  idx = np.nonzero(ok)[0]
  bx = boxes[idx]
  xywh = np.stack([bx[:, 0], bx[:, 1], bx[:, 2] - bx[:, 0],
                   bx[:, 3] - bx[:, 1]], axis=1)
  out = []
  for i, bb, s in zip(idx.tolist(), xywh.tolist(), scores[idx].tolist()):
    if decimals is not None:  # Python's round: the shortest decimal text
      bb, s = [round(v, decimals[0]) for v in bb], round(s, decimals[1])
    rec = {} if image is None else {image_key: image}
    rec['category_id'] = int(cats[i])
    if class_names is not None:
      rec['category_name'] = class_names[int(labels[i])]
    rec['bbox'] = bb
    rec['score'] = float(s)
    out.append(rec)
  return out
