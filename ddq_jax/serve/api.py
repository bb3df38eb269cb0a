"""A Python API for detection: load once, call on images.

    from ddq_jax import Detector
    det = Detector.load('weights/ddq_r50')   # converted dir, .pth or workdir
    result = det('street.jpg')               # or an array / PIL image
    result.boxes (n, 4) xyxy original pixels, result.scores (n,),
    result.labels (n,), result.names (n class names)
    results = det([img_a, img_b, 'c.png'])   # many: a list of results

Images go through the reference's test-time resize
(``data.transforms.apply_test_transform``: keep-ratio resize to
``config.data.test_scale``, OpenCV bilinear) and are placed at the top-left
of a static canvas; the canvas is ``canvas=`` or, by default, the test-scale
bound of the image's orientation ((short, long) for landscape, (long, short)
for portrait).  Images are run in batches of ``batch_size`` (the last batch
padded), so the model compiles once per canvas.  The images go in as
uint8 canvases to the one inference program, ``serve.detect`` (normalisation,
the padding mask, the model and the post-processing), the program that
``evaluate`` measures and ``ddq_jax.serve.export`` serialises.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from ddq_jax.data.class_names import class_names_for
from ddq_jax.data.transforms import apply_test_transform, read_image
from ddq_jax.io.weights import load_weights
from ddq_jax.serve.detect import (detection_records, inference_config,
                                  jit_detect_fn)


@dataclasses.dataclass(frozen=True)
class ImageDetections:
  """Detections of one image, best first.

  boxes (n, 4) float32 xyxy in original-image pixels, scores (n,) float32,
  labels (n,) int32, names: the n class names.
  """
  boxes: np.ndarray
  scores: np.ndarray
  labels: np.ndarray
  names: tuple[str, ...]

  def __len__(self) -> int:
    return int(self.scores.shape[0])

  def to_records(self, image: Any = None) -> list[dict]:
    """COCO-style records (``serve.detect.detection_records``):
    category_id (the label), category_name, bbox [x, y, w, h] (2
    decimals), score (5 decimals), and ``image`` first when given."""
    return detection_records(
        self.boxes, self.scores, self.labels, image=image, image_key='image',
        class_names=dict(zip(self.labels.tolist(), self.names)),
        decimals=(2, 5))


def default_canvas(config, size_hw: Sequence[int]) -> tuple[int, int]:
  """The canvas (H, W) of an image's orientation: the test-scale bound,
  (short, long) for landscape (w >= h), (long, short) for portrait."""
  lo, hi = min(config.data.test_scale), max(config.data.test_scale)
  h, w = int(size_hw[0]), int(size_hw[1])
  return (int(lo), int(hi)) if w >= h else (int(hi), int(lo))


def _as_rgb(image, index: int) -> np.ndarray:
  """(h, w, 3) uint8 RGB from a path, a PIL image or an array."""
  if isinstance(image, (str, os.PathLike)):
    arr = read_image(os.fspath(image))
    if arr is None:
      raise ValueError(f'image {index} ({image}): missing or not a decodable '
                       'image (expected a JPEG/PNG/... file OpenCV can read)')
    return arr
  if hasattr(image, 'convert') and hasattr(image, 'size'):  # PIL
    image = np.asarray(image.convert('RGB'))
  if not isinstance(image, np.ndarray):
    raise TypeError(f'image {index}: expected a path, a PIL image or a numpy '
                    f'array, got {type(image).__name__}')
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape[:2]:
    raise ValueError(f'image {index}: expected an (h, w, 3) RGB array, got '
                     f'shape {image.shape}')
  if image.dtype != np.uint8:
    raise TypeError(f'image {index}: expected dtype uint8 (0..255 RGB), got '
                    f'{image.dtype}')
  return image


def check_score_threshold(value) -> float:
  """``value`` as a float in [0, 1] (a ValueError naming it otherwise)."""
  v = float(value)
  if not 0.0 <= v <= 1.0:
    raise ValueError(f'score_threshold {value!r}: expected a score in [0, 1]')
  return v


def _is_one(images) -> bool:
  return (isinstance(images, (str, os.PathLike))
          or (isinstance(images, np.ndarray) and images.ndim in (2, 3))
          or (hasattr(images, 'convert') and hasattr(images, 'size')))


class Detector:
  """A loaded detector: ``det(images)`` -> ``ImageDetections`` (one image)
  or a list of them (a list of images).

  Args:
    variables: {'params', 'batch_stats'} of the whole model.
    config: its config (``inference_config`` is applied).
    dtype: 'float32' or 'bfloat16' compute.
    batch_size: images per compiled call (the last batch is padded).
    canvas: fixed (H, W) for every image, or None for ``default_canvas``.
    score_threshold: default for ``__call__``.
  """

  def __init__(self, variables: dict, config, *, dtype: str = 'float32',
               batch_size: int = 1,
               canvas: Optional[Sequence[int]] = None,
               score_threshold: float = 0.0):
    if int(batch_size) < 1:
      raise ValueError(f'batch_size: expected >= 1, got {batch_size}')
    if canvas is not None and (len(canvas) != 2 or min(canvas) < 1):
      raise ValueError(f'canvas: expected (H, W) positive, got {canvas}')
    check_score_threshold(score_threshold)
    self.config = inference_config(config)
    self.dtype = dtype
    self.batch_size = int(batch_size)
    self.canvas = None if canvas is None else tuple(int(v) for v in canvas)
    self.score_threshold = float(score_threshold)
    self.class_names = class_names_for(self.config)
    self.variables = jax.device_put(variables)
    # the one inference program; compilation_cache.compile_count(det.detect)
    # counts its compilations (one per canvas and batch size)
    self.detect = jit_detect_fn(self.config, dtype=dtype)

  @classmethod
  def load(cls, path: str, *, config=None, overrides: Optional[dict] = None,
           **kwargs) -> 'Detector':
    """From a converted weights directory, an mmdetection ``.pth`` or a
    ``train.py`` workdir (``weights.load_weights``); ``config``: the
    architecture (default: the one stored with the weights, then
    ``overrides`` {'key.sub': value} apply).  ``kwargs``: see the class.

    Raises ``weights_fit.WeightsMismatchError`` (a ValueError) when the
    weights do not fit the model of that config, or are not finite."""
    variables, config = load_weights(
        os.fspath(path), config,
        overrides=None if config is not None else overrides)
    return cls(variables, config, **kwargs)

  def prepare(self, image, index: int = 0) -> dict:
    """The test-time resize of one image: dict(image (h, w, 3) uint8,
    img_shape (h, w), scale_factor (w, h), orig (the RGB input))."""
    rgb = _as_rgb(image, index)
    out = apply_test_transform(rgb, np.zeros((0, 4), np.float32),
                               np.zeros((0,), np.int64),
                               scale=tuple(self.config.data.test_scale))
    out['orig'] = rgb
    return out

  def run(self, images: np.ndarray, image_sizes: np.ndarray,
          scale_factors: np.ndarray):
    """The jitted program on one prepared batch (``serve.detect``'s
    inputs); returns ``Detections`` as numpy."""
    out = self.detect(self.variables, np.asarray(images, np.uint8),
                      np.asarray(image_sizes, np.int32),
                      np.asarray(scale_factors, np.float32))
    return jax.tree.map(np.asarray, out)

  def __call__(self, images, *, score_threshold: Optional[float] = None):
    one = _is_one(images)
    items = [images] if one else list(images)
    if not items:
      return []
    thr = self.score_threshold if score_threshold is None else float(
        check_score_threshold(score_threshold))
    samples = [self.prepare(im, i) for i, im in enumerate(items)]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
      canvas = self.canvas or default_canvas(self.config, s['img_shape'])
      h, w = s['img_shape']
      if h > canvas[0] or w > canvas[1]:
        raise ValueError(
            f'image {i}: resized to {(h, w)} by the test-time resize '
            f'(test_scale {tuple(self.config.data.test_scale)}), larger than '
            f'the canvas {canvas}')
      groups.setdefault(canvas, []).append(i)
    results: list[Optional[ImageDetections]] = [None] * len(samples)
    for canvas, idx in groups.items():
      for start in range(0, len(idx), self.batch_size):
        chunk = idx[start:start + self.batch_size]
        batch = self._batch([samples[i] for i in chunk], canvas)
        dets = self.run(*batch)
        for j, i in enumerate(chunk):
          keep = dets.valid[j] & (dets.scores[j] >= thr)
          labels = dets.labels[j][keep].astype(np.int32)
          results[i] = ImageDetections(
              boxes=dets.boxes[j][keep], scores=dets.scores[j][keep],
              labels=labels,
              names=tuple(self.class_names[int(l)] for l in labels))
    return results[0] if one else results

  def _batch(self, samples: list[dict], canvas: tuple[int, int]):
    """``canvas_batch`` of ``samples`` at this detector's batch size."""
    return canvas_batch(samples, canvas, batch=self.batch_size)


def canvas_batch(samples: Sequence[dict], canvas: Sequence[int], *,
                 batch: int):
  """(images (B, H, W, 3) uint8, image_sizes (B, 2) int32, scale_factors
  (B, 2) float32) of ``Detector.prepare``'d samples on a (H, W) canvas, B =
  ``batch`` >= len(samples); padding rows are full-canvas zeros."""
  images = np.zeros((batch, canvas[0], canvas[1], 3), np.uint8)
  sizes = np.tile(np.asarray(canvas, np.int32), (batch, 1))
  factors = np.ones((batch, 2), np.float32)
  for i, s in enumerate(samples):
    h, w = s['img_shape']
    images[i, :h, :w] = s['image']
    sizes[i] = (h, w)
    factors[i] = s['scale_factor']
  return images, sizes, factors
