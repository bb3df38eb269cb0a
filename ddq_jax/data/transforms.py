"""Image and box transforms (numpy + OpenCV), faithful to mmcv/mmdet 3.3.0.

All functions are pure: they take arrays, return new arrays, and draw no
random numbers themselves.  The random choices of the training augmentation
are decided up front by NUM_UNIFORMS uniform numbers per sample
(:func:`train_params_from_uniforms`) and the image size only, so the output
shape of a sample can be computed from metadata alone, vectorised over a
whole epoch (:func:`train_output_shapes`), without decoding the image; the
loader uses that to group batches by orientation and to pick one canvas per
global batch on every host.

Conventions: images are (h, w, 3) uint8 (RGB unless said otherwise); boxes
(n, 4) float32 xyxy in pixels; sizes are (h, w) unless named ``*_wh``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import cv2
import numpy as np

# ---------------------------------------------------------------- decoding


def decode_image(data: bytes) -> np.ndarray | None:
  """Decodes encoded image bytes like mmcv (cv2.imdecode, IMREAD_COLOR).

  Returns:
    (h, w, 3) uint8 RGB, or None when the bytes are not a decodable image.
  """
  buf = np.frombuffer(data, dtype=np.uint8)
  if buf.size == 0:
    return None
  try:
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
  except cv2.error:
    return None
  if bgr is None or bgr.ndim != 3 or bgr.shape[0] == 0 or bgr.shape[1] == 0:
    return None
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_image(path: str) -> np.ndarray | None:
  """Reads an image file like mmcv's LoadImageFromFile (OpenCV, colour).

  Returns:
    (h, w, 3) uint8 RGB, or None if the file is missing or not decodable.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError:
    return None
  return decode_image(data)


# ---------------------------------------------------------------- resizing


def rescale_size(*, size_hw: Sequence[int],
                 scale: Sequence[int]) -> tuple[tuple[int, int], float]:
  """mmcv.rescale_size for a tuple scale (keep_ratio=True).

  factor = min(max(scale) / long side, min(scale) / short side);
  new side = max(1, int(side * factor + 0.5)) (mmcv's rounding; where it
  gives 0, extreme aspect ratios such as 1 x 5000, we keep 1).

  Args:
    size_hw: (h, w) of the input.
    scale: (a, b) in any order, e.g. (1333, 800) or (480, 1333).
  Returns:
    ((new_h, new_w), factor).
  """
  h, w = int(size_hw[0]), int(size_hw[1])
  max_long, max_short = max(scale), min(scale)
  factor = min(max_long / max(h, w), max_short / min(h, w))
  # At least 1: a side that mmcv rounds to 0 (1 x 5000 at (1333, 800)) has
  # no image for OpenCV to make; ours keeps one row / column there.
  new_w = max(1, int(w * float(factor) + 0.5))
  new_h = max(1, int(h * float(factor) + 0.5))
  return (new_h, new_w), factor


def resize_keep_ratio(image: np.ndarray, boxes: np.ndarray, *,
                      scale: Sequence[int]
                      ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
  """mmdet ``Resize(scale, keep_ratio=True)`` (cv2 backend, bilinear).

  Args:
    image: (h, w, C) uint8.
    boxes: (n, 4) float32 xyxy.
    scale: the (long, short) limits in any order.
  Returns:
    image (new_h, new_w, C) uint8 (cv2.INTER_LINEAR), boxes (n, 4) float32
    scaled by (new_w / w, new_h / h) and clipped to the new image,
    scale_factor (w_scale, h_scale) = (new_w / w, new_h / h).
  """
  h, w = image.shape[:2]
  (new_h, new_w), _ = rescale_size(size_hw=(h, w), scale=scale)
  out = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  if out.ndim == 2:
    out = out[..., None]
  sf = (new_w / w, new_h / h)
  boxes = rescale_boxes(boxes, scale_factor=sf)
  boxes = clip_boxes(boxes, shape_hw=(new_h, new_w))
  return out, boxes, sf


def rescale_boxes(boxes: np.ndarray, *,
                  scale_factor: Sequence[float]) -> np.ndarray:
  """boxes (n, 4) * (sx, sy, sx, sy) in float32, like HorizontalBoxes."""
  f = np.asarray(scale_factor, np.float32)
  return boxes.astype(np.float32) * np.concatenate([f, f])


def clip_boxes(boxes: np.ndarray, *, shape_hw: Sequence[int]) -> np.ndarray:
  """Clips (n, 4) xyxy boxes to [0, w] x [0, h]."""
  out = boxes.astype(np.float32, copy=True)
  out[:, 0::2] = np.clip(out[:, 0::2], 0, shape_hw[1])
  out[:, 1::2] = np.clip(out[:, 1::2], 0, shape_hw[0])
  return out


def hflip(image: np.ndarray, boxes: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
  """Horizontal flip of an (h, w, C) image and its (n, 4) boxes:
  x1' = w - x2, x2' = w - x1 (mmdet HorizontalBoxes.flip_)."""
  w = image.shape[1]
  out = boxes.astype(np.float32, copy=True)
  out[:, 0] = w - boxes[:, 2]
  out[:, 2] = w - boxes[:, 0]
  return np.ascontiguousarray(image[:, ::-1]), out


def crop(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, *,
         offset_hw: Sequence[int], crop_hw: Sequence[int]
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """mmdet ``RandomCrop._crop_data`` with given offset/size
  (bbox_clip_border=True, allow_negative_crop=True).

  Boxes are translated, clipped, and kept when partly inside
  (x1 < w, y1 < h, x2 > 0, y2 > 0), as ``HorizontalBoxes.is_inside``.
  Returns:
    image (ch, cw, C), boxes (m, 4), labels (m,).
  """
  oy, ox = int(offset_hw[0]), int(offset_hw[1])
  img = image[oy:oy + int(crop_hw[0]), ox:ox + int(crop_hw[1])]
  h, w = img.shape[:2]
  b = boxes.astype(np.float32) - np.asarray([ox, oy, ox, oy], np.float32)
  b = clip_boxes(b, shape_hw=(h, w))
  keep = (b[:, 0] < w) & (b[:, 1] < h) & (b[:, 2] > 0) & (b[:, 3] > 0)
  return np.ascontiguousarray(img), b[keep], labels[keep]


# ---------------------------------------------------- training augmentation


class TrainParams(NamedTuple):
  """The random choices of one training sample (see sample_train_params)."""
  flip: bool
  branch: int                 # 0: resize only; 1: resize-crop-resize
  scale: tuple[int, int]      # final RandomChoiceResize scale
  crop_scale: tuple[int, int]  # branch 1: first resize scale
  crop_hw: tuple[int, int]    # branch 1: crop size (after the first resize)
  offset_hw: tuple[int, int]  # branch 1: crop offset


NUM_UNIFORMS = 8  # uniforms in [0, 1) that decide one sample's augmentation


def _pick(u, n):
  """floor(u * n) for u in [0, 1): an index in [0, n)."""
  return np.minimum(np.floor(np.asarray(u, np.float64) * n).astype(np.int64),
                    n - 1)


def train_params_from_uniforms(u: np.ndarray, *, size_hw: Sequence[int],
                               scales: Sequence[Sequence[int]],
                               crop_scales: Sequence[Sequence[int]],
                               crop_size: Sequence[int]) -> TrainParams:
  """The reference train_pipeline's random choices for one image.

  RandomFlip(0.5) -> RandomChoice([[RandomChoiceResize(scales)],
  [RandomChoiceResize(crop_scales), RandomCrop('absolute_range', crop_size,
  allow_negative_crop=True), RandomChoiceResize(scales)]]) (equal
  probabilities), decided by ``u`` (NUM_UNIFORMS,) uniforms in [0, 1) and
  the original (h, w) only.  :func:`train_output_shapes` is the vectorised
  twin for shapes.
  """
  u = np.asarray(u, np.float64)
  flip = bool(u[0] < 0.5)
  branch = int(_pick(u[1], 2))
  crop_scale, crop_hw, offset = (0, 0), (0, 0), (0, 0)
  if branch == 1:
    crop_scale = tuple(int(v) for v in crop_scales[int(_pick(
        u[2], len(crop_scales)))])
    (h, w), _ = rescale_size(size_hw=size_hw, scale=crop_scale)
    lo, hi = int(crop_size[0]), int(crop_size[1])
    ch = min(h, lo) + int(_pick(u[3], min(h, hi) - min(h, lo) + 1))
    cw = min(w, lo) + int(_pick(u[4], min(w, hi) - min(w, lo) + 1))
    oy = int(_pick(u[5], max(h - ch, 0) + 1))
    ox = int(_pick(u[6], max(w - cw, 0) + 1))
    crop_hw, offset = (ch, cw), (oy, ox)
  scale = tuple(int(v) for v in scales[int(_pick(u[7], len(scales)))])
  return TrainParams(flip, branch, scale, crop_scale, crop_hw, offset)


def sample_train_params(rng: np.random.Generator, *, size_hw: Sequence[int],
                        scales: Sequence[Sequence[int]],
                        crop_scales: Sequence[Sequence[int]],
                        crop_size: Sequence[int]) -> TrainParams:
  """train_params_from_uniforms with uniforms drawn from ``rng``."""
  return train_params_from_uniforms(
      rng.random(NUM_UNIFORMS), size_hw=size_hw, scales=scales,
      crop_scales=crop_scales, crop_size=crop_size)


def _rescale_sizes(h, w, scale_ab):
  """Vectorised rescale_size: h, w (n,) ints, scale_ab (n, 2)."""
  h = np.asarray(h, np.float64)
  w = np.asarray(w, np.float64)
  max_long = np.max(scale_ab, 1).astype(np.float64)
  max_short = np.min(scale_ab, 1).astype(np.float64)
  f = np.minimum(max_long / np.maximum(h, w), max_short / np.minimum(h, w))
  return (np.floor(h * f + 0.5).astype(np.int64),
          np.floor(w * f + 0.5).astype(np.int64))


def train_output_shapes(u: np.ndarray, *, sizes: np.ndarray,
                        scales: Sequence[Sequence[int]],
                        crop_scales: Sequence[Sequence[int]],
                        crop_size: Sequence[int]) -> np.ndarray:
  """(n, 2) output (h, w) of the training augmentation, vectorised.

  Args:
    u: (n, NUM_UNIFORMS) uniforms; sizes: (n, 2) original (h, w).
  Equals ``train_output_shape(train_params_from_uniforms(u[i], ...))``.
  """
  u = np.asarray(u, np.float64).reshape(-1, NUM_UNIFORMS)
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  scales = np.asarray(scales, np.int64)
  crop_scales = np.asarray(crop_scales, np.int64)
  h, w = sizes[:, 0], sizes[:, 1]
  crop = _pick(u[:, 1], 2) == 1
  ch_, cw_ = _rescale_sizes(h, w, crop_scales[_pick(u[:, 2],
                                                    len(crop_scales))])
  lo, hi = int(crop_size[0]), int(crop_size[1])
  ch = np.minimum(ch_, lo) + _pick(
      u[:, 3], np.minimum(ch_, hi) - np.minimum(ch_, lo) + 1)
  cw = np.minimum(cw_, lo) + _pick(
      u[:, 4], np.minimum(cw_, hi) - np.minimum(cw_, lo) + 1)
  h = np.where(crop, ch, h)
  w = np.where(crop, cw, w)
  nh, nw = _rescale_sizes(h, w, scales[_pick(u[:, 7], len(scales))])
  return np.stack([nh, nw], 1)


def train_output_shape(params: TrainParams, *,
                       size_hw: Sequence[int]) -> tuple[int, int]:
  """(h, w) that :func:`apply_train_transform` will produce, from metadata."""
  h, w = int(size_hw[0]), int(size_hw[1])
  if params.branch == 1:
    (h, w), _ = rescale_size(size_hw=(h, w), scale=params.crop_scale)
    h = min(params.crop_hw[0], h - params.offset_hw[0])
    w = min(params.crop_hw[1], w - params.offset_hw[1])
  (h, w), _ = rescale_size(size_hw=(h, w), scale=params.scale)
  return h, w


def apply_train_transform(image: np.ndarray, boxes: np.ndarray,
                          labels: np.ndarray, *, params: TrainParams
                          ) -> dict:
  """Applies the training augmentation chosen by ``params``.

  Args:
    image: (h, w, 3) uint8; boxes (n, 4) float32 xyxy; labels (n,) int32.
  Returns:
    dict(image (h', w', 3) uint8, boxes (m, 4) float32, labels (m,) int32,
    img_shape (h', w'), scale_factor of the last resize, as mmdet reports).
  """
  if params.flip:
    image, boxes = hflip(image, boxes)
  if params.branch == 1:
    image, boxes, _ = resize_keep_ratio(image, boxes, scale=params.crop_scale)
    image, boxes, labels = crop(image, boxes, labels,
                                offset_hw=params.offset_hw,
                                crop_hw=params.crop_hw)
  image, boxes, sf = resize_keep_ratio(image, boxes, scale=params.scale)
  return dict(image=image, boxes=boxes, labels=labels,
              img_shape=image.shape[:2], scale_factor=sf)


def apply_test_transform(image: np.ndarray, boxes: np.ndarray,
                         labels: np.ndarray, *, scale: Sequence[int]) -> dict:
  """Test-time ``Resize(scale, keep_ratio=True)`` (no flip, no crop).

  Returns the same dict as :func:`apply_train_transform`; scale_factor is
  mmdet's (new_w / w, new_h / h).
  """
  image, boxes, sf = resize_keep_ratio(image, boxes, scale=scale)
  return dict(image=image, boxes=boxes, labels=labels,
              img_shape=image.shape[:2], scale_factor=sf)


def normalize(image: np.ndarray, *, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """(x - mean) / std in float32 on an (h, w, 3) RGB image."""
  return ((image.astype(np.float32) - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))
