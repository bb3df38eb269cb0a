"""Index arithmetic for in-range indices and the slice-free box formulas:
the same values as jnp's general operators and the coordinate-wise
formulas (op by op, numpy float32), bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax.ops import boxes as box_ops
from ddq_jax.ops import indexing


def test_nonneg_div_rem_and_in_range_take():
  r = np.random.default_rng(0)
  a = r.integers(0, 10_000, size=(50,)).astype(np.int32)
  for b in (1, 3, 7, 256):
    np.testing.assert_array_equal(jax.jit(indexing.div_nonneg)(a, b), a // b)
    np.testing.assert_array_equal(jax.jit(indexing.rem_nonneg)(a, b), a % b)
  u = r.integers(0, 2 ** 32, size=(20,), dtype=np.uint64).astype(np.uint32)
  np.testing.assert_array_equal(indexing.rem_nonneg(u, 80), u % 80)
  arr = r.normal(size=(3, 9, 4)).astype(np.float32)
  idx = r.integers(0, 9, size=(3, 5, 1))
  np.testing.assert_array_equal(
      jax.jit(lambda x, i: indexing.take_along_axis_in_range(x, i, 1))(
          arr, idx), np.take_along_axis(arr, idx, 1))


def _np_giou(a, b, eps=np.float32(1e-6)):
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
  lt, rb = np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])
  wh = np.clip(rb - lt, 0, None)
  ov = wh[..., 0] * wh[..., 1]
  un = np.maximum(area(a) + area(b) - ov, eps)
  elt, erb = np.minimum(a[..., :2], b[..., :2]), np.maximum(a[..., 2:], b[..., 2:])
  ewh = np.clip(erb - elt, 0, None)
  ea = np.maximum(ewh[..., 0] * ewh[..., 1], eps)
  return ov / un, ov / un - (ea - un) / ea


@pytest.mark.parametrize('scale', [1e-3, 1.0, 1333.0])
def test_box_formulas_bit_exact(scale):
  r = np.random.default_rng(1)
  cxcywh = (r.random((2000, 4)) * scale).astype(np.float32)
  cx, cy, w, h = (cxcywh[:, k] for k in range(4))
  xyxy = np.stack([cx - np.float32(0.5) * w, cy - np.float32(0.5) * h,
                   cx + np.float32(0.5) * w, cy + np.float32(0.5) * h], -1)
  np.testing.assert_array_equal(box_ops.cxcywh_to_xyxy(cxcywh), xyxy)
  x1, y1, x2, y2 = (xyxy[:, k] for k in range(4))
  back = np.stack([(x1 + x2) / np.float32(2), (y1 + y2) / np.float32(2),
                   x2 - x1, y2 - y1], -1)
  np.testing.assert_array_equal(box_ops.xyxy_to_cxcywh(xyxy), back)
  np.testing.assert_array_equal(box_ops.box_area(xyxy),
                                (x2 - x1) * (y2 - y1))
  other = np.roll(xyxy, 7, axis=0)
  iou, giou = _np_giou(xyxy, other)
  np.testing.assert_array_equal(box_ops.aligned_giou(xyxy, other), giou)
  piou, _ = _np_giou(xyxy[:50, None], other[None, :40])
  np.testing.assert_array_equal(jax.jit(box_ops.pairwise_iou)(
      xyxy[:50], other[:40]), piou)
