"""Jitted prediction: images in, detections out, one compiled program per
input shape and no host round trip inside.

    model = build_model(config)
    predict = make_predict_fn(model)
    dets = predict(variables, images, pad_mask, img_shapes, scale_factors)
    dets.boxes (B, M, 4) xyxy in original-image pixels, dets.scores (B, M),
    dets.labels (B, M) int32, dets.valid (B, M) bool (``Detections``).

Inputs are checked on the host *before* tracing (dtype / rank / shape only:
nothing is copied off the device), with errors that name the bad input.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

import jax
import numpy as np


def _describe(x) -> str:
  return (f'{type(x).__name__} dtype={getattr(x, "dtype", None)} '
          f'shape={tuple(getattr(x, "shape", ()))}')


def validate_predict_inputs(images, pad_mask, img_shapes,
                            scale_factors) -> None:
  """Raises ValueError / TypeError naming the bad input and what was
  expected.  Shapes: images (B, H, W, 3) float32 NHWC normalised RGB;
  pad_mask (B, H, W) bool (True = padding); img_shapes (B, 2) real (h, w);
  scale_factors (B, 2) (w, h)."""
  for name, x in (('images', images), ('pad_mask', pad_mask),
                  ('img_shapes', img_shapes),
                  ('scale_factors', scale_factors)):
    if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
      raise TypeError(f'{name}: expected an array (numpy or jax), got '
                      f'{type(x).__name__}')
  if np.dtype(images.dtype) != np.float32:
    raise TypeError(f'images: expected dtype float32 (normalised RGB), got '
                    f'{_describe(images)}')
  if images.ndim != 4:
    raise ValueError(f'images: expected rank 4 (B, H, W, 3) NHWC, got '
                     f'{_describe(images)}')
  if images.shape[-1] != 3:
    raise ValueError(f'images: expected 3 channels last (B, H, W, 3) NHWC, '
                     f'got {_describe(images)}')
  b, h, w, _ = images.shape
  if np.dtype(pad_mask.dtype) != np.bool_:
    raise TypeError(f'pad_mask: expected dtype bool (True = padding), got '
                    f'{_describe(pad_mask)}')
  if tuple(pad_mask.shape) != (b, h, w):
    raise ValueError(f'pad_mask: expected shape (B, H, W) = {(b, h, w)} '
                     f'matching images, got {_describe(pad_mask)}')
  for name, x, what in (('img_shapes', img_shapes, '(h, w)'),
                        ('scale_factors', scale_factors, '(w, h)')):
    if tuple(x.shape) != (b, 2):
      raise ValueError(f'{name}: expected shape (B, 2) = {(b, 2)} of {what}, '
                       f'got {_describe(x)}')
    kind = np.dtype(x.dtype).kind
    if kind not in 'iuf':
      raise TypeError(f'{name}: expected a numeric dtype, got {_describe(x)}')


def make_predict_fn(model, *, semantics: Optional[str] = None) -> Callable:
  """A jitted ``fn(variables, images, pad_mask, img_shapes, scale_factors)``
  -> ``models.outputs.Detections``.

  ``model``: a ``DDQDETR``.  ``semantics``: optional override of
  ``config.distinct_mask_semantics``.  The returned function has
  ``trace_count()`` (number of traces so far: one per distinct input shape)
  and ``jitted`` (the underlying jitted function, no validation).
  """
  traces = [0]

  def _predict(variables, images, pad_mask, img_shapes, scale_factors):
    traces[0] += 1  # runs at trace time only
    return model.apply(variables, images, pad_mask, img_shapes=img_shapes,
                       scale_factors=scale_factors,
                       semantics=semantics).detections

  jitted = jax.jit(_predict)

  def predict(variables, images, pad_mask, img_shapes, scale_factors):
    if not isinstance(variables, Mapping) or 'params' not in variables:
      raise TypeError("variables: expected a dict with 'params' (and "
                      "'batch_stats'), e.g. the converted checkpoint")
    validate_predict_inputs(images, pad_mask, img_shapes, scale_factors)
    return jitted(variables, images, pad_mask, img_shapes, scale_factors)

  predict.trace_count = lambda: traces[0]
  predict.jitted = jitted
  return predict
