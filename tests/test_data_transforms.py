"""Transforms: resize parity with OpenCV and mmcv's formula, flip, crop."""
import json
import os

import cv2
import numpy as np
import pytest

from ddq_jax.data import transforms as T

# mmcv 2.1.0's own keep-ratio rescale_size on 1,060 (size, scale) pairs
# (the sizes below and 200 random ones under SCALES), recorded by the
# reference (fixtures README: mmcv_rescale_sizes.json).
MMCV_SIZES = os.path.join(os.path.dirname(__file__), 'data',
                          'mmcv_rescale_sizes.json')


SIZES = [(480, 640), (640, 480), (427, 640), (333, 500), (1, 1), (612, 612),
         (230, 1333), (800, 1333), (1000, 3), (375, 500), (500, 375),
         (97, 131)]
SCALES = [(1333, 800), (480, 1333), (800, 1333), (400, 4200), (160, 128)]


def test_rescale_size_matches_mmcv():
  with open(MMCV_SIZES) as f:
    rows = json.load(f)['rows']
  assert len(rows) >= 1000
  zero = 0
  for r in rows:
    (nh, nw), _ = T.rescale_size(size_hw=(r['h'], r['w']),
                                 scale=tuple(r['scale']))
    # where mmcv rounds a side to 0 (no image OpenCV can make) we keep 1
    zero += min(r['new_h'], r['new_w']) == 0
    assert (nh, nw) == (max(1, r['new_h']), max(1, r['new_w'])), r
  assert zero  # the departure is exercised


def test_rescale_size_formula():
  # 480x640 for (1333, 800): min(1333/640, 800/480) = 1.6667 -> 800x1067
  (nh, nw), f = T.rescale_size(size_hw=(480, 640), scale=(1333, 800))
  assert (nh, nw) == (800, 1067) and f == pytest.approx(800 / 480)
  # very wide: long side limits
  (nh, nw), _ = T.rescale_size(size_hw=(200, 1000), scale=(1333, 800))
  assert (nh, nw) == (int(200 * 1.333 + 0.5), 1333)


def test_resize_matches_cv2_and_scales_boxes():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
  boxes = np.array([[10, 20, 50, 60], [0, 0, 131, 97]], np.float32)
  out, b, sf = T.resize_keep_ratio(img, boxes, scale=(1333, 800))
  (nh, nw), _ = T.rescale_size(size_hw=(97, 131), scale=(1333, 800))
  ref = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
  assert out.dtype == np.uint8 and out.shape == (nh, nw, 3)
  np.testing.assert_array_equal(out, ref)
  assert sf == (nw / 131, nh / 97)
  np.testing.assert_allclose(b[0], [10 * nw / 131, 20 * nh / 97,
                                    50 * nw / 131, 60 * nh / 97], rtol=1e-6)
  np.testing.assert_allclose(b[1], [0, 0, nw, nh], rtol=1e-6)


def test_test_transform_reports_mmdet_scale_factor():
  img = np.zeros((427, 640, 3), np.uint8)
  out = T.apply_test_transform(img, np.zeros((0, 4), np.float32),
                               np.zeros((0,), np.int32), scale=(1333, 800))
  assert out['img_shape'] == (800, 1199)
  assert out['scale_factor'] == (1199 / 640, 800 / 427)


def test_decode_is_opencv_bgr_to_rgb(tmp_path):
  img = np.zeros((4, 5, 3), np.uint8)
  img[..., 0] = 200  # red in RGB
  path = str(tmp_path / 'a.png')
  cv2.imwrite(path, img[..., ::-1])
  out = T.read_image(path)
  np.testing.assert_array_equal(out, img)
  assert T.read_image(str(tmp_path / 'missing.jpg')) is None
  (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0not a jpeg')
  assert T.read_image(str(tmp_path / 'bad.jpg')) is None


def test_hflip_boxes_and_pixels():
  img = np.zeros((10, 20, 3), np.uint8)
  img[2:5, 3:8] = 255
  boxes = np.array([[3, 2, 8, 5]], np.float32)
  fimg, fb = T.hflip(img, boxes)
  np.testing.assert_array_equal(fb, [[12, 2, 17, 5]])
  ys, xs = np.nonzero(fimg[..., 0])
  assert xs.min() == 12 and xs.max() + 1 == 17


def test_crop_translates_clips_and_drops():
  img = np.arange(100 * 120 * 3, dtype=np.int64).reshape(100, 120, 3)
  boxes = np.array([[10, 10, 30, 30],     # fully inside the crop
                    [0, 0, 25, 25],       # partly inside -> clipped
                    [90, 80, 110, 95],    # outside (right/bottom) -> dropped
                    [0, 0, 15, 15]],      # outside (left/top) -> dropped
                   np.float32)
  labels = np.array([0, 1, 2, 3], np.int32)
  out, b, l = T.crop(img, boxes, labels, offset_hw=(20, 15), crop_hw=(50, 60))
  np.testing.assert_array_equal(out, img[20:70, 15:75])
  np.testing.assert_array_equal(l, [0, 1])
  np.testing.assert_array_equal(b, [[0, 0, 15, 10], [0, 0, 10, 5]])


def test_train_transform_shape_prediction_and_boxes():
  rng = np.random.default_rng(3)
  for i in range(60):
    h, w = (int(v) for v in rng.integers(20, 400, 2))
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x1, y1 = rng.uniform(0, w - 5), rng.uniform(0, h - 5)
    boxes = np.array([[x1, y1, min(w, x1 + 30), min(h, y1 + 30)]],
                     np.float32)
    p = T.sample_train_params(np.random.default_rng(i), size_hw=(h, w),
                              scales=((96, 160), (128, 160)),
                              crop_scales=((96, 200), (128, 200)),
                              crop_size=(64, 96))
    out = T.apply_train_transform(img, boxes, np.zeros(1, np.int32),
                                  params=p)
    assert out['image'].shape[:2] == T.train_output_shape(p, size_hw=(h, w))
    oh, ow = out['image'].shape[:2]
    assert max(oh, ow) <= 160 and min(oh, ow) <= 128
    b = out['boxes']
    assert len(b) == len(out['labels'])
    assert np.all(b[:, 0::2] >= 0) and np.all(b[:, 0::2] <= ow)
    assert np.all(b[:, 1::2] >= 0) and np.all(b[:, 1::2] <= oh)
    assert np.all(b[:, 2] > 0) and np.all(b[:, 0] < ow)
    if p.branch == 0:  # no crop: the one box always survives, scaled
      sx, sy = out['scale_factor']
      ref = boxes[0].copy()
      if p.flip:
        ref[[0, 2]] = w - boxes[0, [2, 0]]
      np.testing.assert_allclose(b[0], ref * [sx, sy, sx, sy], atol=1e-3)


def test_vectorised_output_shapes_match_scalar():
  rng = np.random.default_rng(7)
  n = 3000
  sizes = rng.integers(1, 1500, (n, 2))
  u = rng.random((n, T.NUM_UNIFORMS))
  u[:5] = 0.0
  u[5:10] = np.nextafter(1.0, 0.0)
  kw = dict(scales=tuple((s, 1333) for s in range(480, 801, 32)),
            crop_scales=((400, 4200), (500, 4200), (600, 4200)),
            crop_size=(384, 600))
  vec = T.train_output_shapes(u, sizes=sizes, **kw)
  for i in range(n):
    p = T.train_params_from_uniforms(u[i], size_hw=sizes[i], **kw)
    assert tuple(vec[i]) == T.train_output_shape(p, size_hw=sizes[i]), i


def test_train_params_deterministic_and_cover_both_branches():
  def draw(i):
    return T.sample_train_params(np.random.default_rng(i), size_hw=(480, 640),
                                 scales=((480, 1333), (800, 1333)),
                                 crop_scales=((400, 4200),),
                                 crop_size=(384, 600))
  ps = [draw(i) for i in range(200)]
  assert ps == [draw(i) for i in range(200)]
  assert {p.branch for p in ps} == {0, 1} and {p.flip for p in ps} == {0, 1}
  for p in ps:
    if p.branch == 1:
      assert 384 <= p.crop_hw[0] <= 400 and 384 <= p.crop_hw[1] <= 533


def test_normalize():
  img = np.full((2, 2, 3), 100, np.uint8)
  out = T.normalize(img, mean=(100, 50, 0), std=(1, 2, 4))
  np.testing.assert_allclose(out[0, 0], [0, 25, 25])
  assert out.dtype == np.float32
