"""Batching, canvases, sharding, resume, eval padding, grain workers."""
import os

import cv2
import numpy as np
import pytest

from ddq_jax.config import load_config
from ddq_jax.data import build_dataset, make_eval_iterator, make_train_iterator
from ddq_jax.data.batching import collate, select_canvas
from ddq_jax.data.synthetic import SyntheticSource, write_coco_folder

KEYS = {'images': np.float32, 'pad_mask': np.bool_, 'img_shapes': np.int32,
        'scale_factors': np.float32, 'orig_sizes': np.int32,
        'gt_boxes': np.float32, 'gt_labels': np.int32, 'gt_valid': np.bool_,
        'image_ids': np.int64, 'sample_valid': np.bool_}


@pytest.fixture(scope='module')
def cfg():
  # A square canvas lets mixed-orientation leftover batches fit (as the
  # R50 config's (1344, 1344)); test_no_square_canvas covers the other case.
  c = load_config('tiny', {'data.synthetic_num_train': 40,
                           'data.synthetic_num_eval': 13,
                           'train.global_batch_size': 8,
                           'data.canvas_sizes': ((128, 128), (128, 160),
                                                 (160, 128), (160, 160))})
  return c


@pytest.fixture(scope='module')
def train_ds(cfg):
  return build_dataset(cfg, 'train')


def _check_contract(b, cfg, batch, *, images=np.float32):
  """The batch contract; ``images``: float32 (training) or uint8 (the
  evaluation's canvases)."""
  g = cfg.loss.max_gt
  assert set(b) == set(KEYS)
  for k, dt in dict(KEYS, images=images).items():
    assert b[k].dtype == dt, k
    assert b[k].shape[0] == batch, k
  _, h, w, _ = b['images'].shape
  assert (h, w) in [tuple(c) for c in cfg.data.canvas_sizes]
  assert b['pad_mask'].shape == (batch, h, w)
  assert b['gt_boxes'].shape == (batch, g, 4)
  for i in range(batch):
    ih, iw = b['img_shapes'][i]
    assert not b['pad_mask'][i, :ih, :iw].any()
    assert b['pad_mask'][i].sum() == h * w - ih * iw
    assert np.all(b['images'][i][b['pad_mask'][i]] == 0)
    v = b['gt_valid'][i]
    n = v.sum()
    assert v[:n].all() and not v[n:].any()
    bx = b['gt_boxes'][i, :n]
    assert np.all(bx[:, 0] < bx[:, 2]) and np.all(bx[:, 1] < bx[:, 3])
    assert np.all(bx[:, 2] <= iw) and np.all(bx[:, 3] <= ih)
    assert np.all(bx >= 0)
    assert np.all(b['gt_boxes'][i, n:] == 0)
    assert np.all((b['gt_labels'][i, :n] >= 0)
                  & (b['gt_labels'][i, :n] < 8))


def test_select_canvas():
  cs = ((800, 1344), (1344, 800), (1344, 1344))
  assert select_canvas([(800, 1333), (600, 900)], canvas_sizes=cs) == (
      800, 1344)
  assert select_canvas([(1333, 800)], canvas_sizes=cs) == (1344, 800)
  assert select_canvas([(800, 1333), (1333, 800)], canvas_sizes=cs) == (
      1344, 1344)
  with pytest.raises(ValueError, match='no canvas'):
    select_canvas([(1400, 10)], canvas_sizes=cs)


def test_collate_padding_masks_and_max_gt():
  s1 = dict(image=np.full((3, 4, 3), 10, np.uint8),
            boxes=np.array([[0, 0, 2, 2]] * 5, np.float32),
            labels=np.arange(5), scale_factor=(2.0, 3.0), orig_size=(1, 2),
            image_id=7)
  s2 = dict(image=np.full((5, 2, 3), 20, np.uint8),
            boxes=np.zeros((0, 4), np.float32), labels=np.zeros((0,)),
            scale_factor=(1.0, 1.0), orig_size=(5, 2), image_id=8)
  b = collate([s1, s2], canvas=(5, 6), max_gt=3, mean=(10, 10, 10),
              std=(2, 2, 2), valid=[True, False])
  assert b['images'].shape == (2, 5, 6, 3)
  np.testing.assert_array_equal(b['pad_mask'][0, :3, :4], False)
  assert b['pad_mask'][0, 3:].all() and b['pad_mask'][0, :, 4:].all()
  np.testing.assert_array_equal(b['images'][1, :5, :2], 5.0)
  np.testing.assert_array_equal(b['img_shapes'], [[3, 4], [5, 2]])
  np.testing.assert_array_equal(b['gt_labels'][0], [0, 1, 2])  # first G
  np.testing.assert_array_equal(b['gt_valid'], [[1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(b['image_ids'], [7, -1])
  np.testing.assert_array_equal(b['sample_valid'], [True, False])
  np.testing.assert_allclose(b['scale_factors'][0], [2, 3])


def test_train_batches_contract_and_determinism(cfg, train_ds):
  it = make_train_iterator(cfg, seed=3, dataset=train_ds, num_workers=0)
  assert it.steps_per_epoch == 5
  batches = [next(it) for _ in range(7)]
  for b in batches:
    _check_contract(b, cfg, 8)
    assert b['sample_valid'].all()
  it2 = make_train_iterator(cfg, seed=3, dataset=train_ds, num_workers=0)
  for b in batches:
    b2 = next(it2)
    for k in b:
      np.testing.assert_array_equal(b[k], b2[k])
  other = next(make_train_iterator(cfg, seed=4, dataset=train_ds,
                                   num_workers=0))
  assert set(other['image_ids']) != set(batches[0]['image_ids'])
  # one epoch covers each image at most once; epochs differ
  ep0 = np.concatenate([b['image_ids'] for b in batches[:5]])
  assert len(set(ep0)) == 40
  assert not np.array_equal(batches[0]['image_ids'], batches[5]['image_ids'])


def test_resume_reproduces_next_batch(cfg, train_ds):
  it = make_train_iterator(cfg, seed=0, dataset=train_ds, num_workers=0)
  for _ in range(6):
    next(it)
  state = it.get_state()
  assert state == {'step': 6} and it.epoch == 1
  want = next(it)
  resumed = make_train_iterator(cfg, seed=0, start_step=state['step'],
                                dataset=train_ds, num_workers=0)
  got = next(resumed)
  for k in want:
    np.testing.assert_array_equal(want[k], got[k])
  it.set_state(state)
  again = next(it)
  np.testing.assert_array_equal(again['images'], want['images'])


def test_sharding_disjoint_complete_and_same_canvas(cfg, train_ds):
  full = make_train_iterator(cfg, seed=1, dataset=train_ds, num_workers=0)
  hosts = [make_train_iterator(cfg, seed=1, dataset=train_ds, num_workers=0,
                               process_index=p, process_count=4)
           for p in range(4)]
  seen = []
  for _ in range(full.steps_per_epoch):
    f = next(full)
    parts = [next(h) for h in hosts]
    for p in parts:
      _check_contract(p, cfg, 2)
      assert p['images'].shape[1:] == f['images'].shape[1:]  # global canvas
    ids = np.concatenate([p['image_ids'] for p in parts])
    np.testing.assert_array_equal(ids, f['image_ids'])
    np.testing.assert_array_equal(
        np.concatenate([p['images'] for p in parts]), f['images'])
    seen.extend(ids.tolist())
  assert len(seen) == len(set(seen)) == 40  # disjoint and complete
  with pytest.raises(ValueError, match='divisible'):
    make_train_iterator(cfg, seed=1, dataset=train_ds, process_count=3)


def test_no_square_canvas():
  c = load_config('tiny', {'data.synthetic_num_train': 44,
                           'train.global_batch_size': 8})
  it = make_train_iterator(c, seed=0, num_workers=0)
  for epoch in range(4):
    ids = []
    for _ in range(it.steps_per_epoch):
      b = next(it)  # always fits one of the tiny (non-square) canvases
      assert b['images'].shape[1:3] in ((128, 160), (160, 128), (128, 128))
      ids.extend(b['image_ids'].tolist())
    assert len(ids) == 40 and len(set(ids)) >= 30


def test_aspect_grouping_keeps_small_canvases(cfg):
  c = load_config('tiny', {'data.synthetic_num_train': 64})
  it = make_train_iterator(c, seed=0, num_workers=0)
  canv = [next(it)['images'].shape[1:3] for _ in range(it.steps_per_epoch)]
  # batches of one orientation fit (128, 160) or (160, 128)
  assert all(cv in ((128, 160), (160, 128), (128, 128)) for cv in canv)


def test_eval_iterator_pads_last_batch(cfg):
  ev = make_eval_iterator(cfg, batch_size=4, num_workers=0)
  batches = list(ev)
  assert len(ev) == len(batches) in (4, 5)
  valid = np.concatenate([b['sample_valid'] for b in batches])
  ids = np.concatenate([b['image_ids'] for b in batches])
  assert valid.sum() == 13 and len(valid) - 13 < 2 * 4
  assert sorted(ids[valid].tolist()) == list(range(1, 14))
  assert np.all(ids[~valid] == -1)
  for b in batches:
    _check_contract(b, cfg, 4, images=np.uint8)
    for i in np.nonzero(~b['sample_valid'])[0]:
      assert not b['gt_valid'][i].any()
      assert np.all(b['img_shapes'][i] > 0)
  # sharded eval: same batch count on every host, union = the split
  parts = [list(make_eval_iterator(cfg, batch_size=2, num_workers=0,
                                   process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) in (4, 5)
  ids = np.concatenate([b['image_ids'] for p in parts for b in p])
  assert sorted(ids[ids >= 0].tolist()) == list(range(1, 14))


def test_eval_test_resize_and_gt(cfg):
  ds = build_dataset(cfg, 'validation')
  b = next(iter(make_eval_iterator(cfg, batch_size=2, num_workers=0,
                                   dataset=ds)))
  for i in range(2):
    idx = int(np.nonzero(ds.image_ids == b['image_ids'][i])[0][0])
    r = ds.load(idx)
    h, w = r['image'].shape[:2]
    f = min(160 / max(h, w), 128 / min(h, w))
    nh, nw = int(h * f + 0.5), int(w * f + 0.5)
    np.testing.assert_array_equal(b['img_shapes'][i], [nh, nw])
    np.testing.assert_array_equal(b['orig_sizes'][i], [h, w])
    np.testing.assert_allclose(b['scale_factors'][i], [nw / w, nh / h])
    ref = cv2.resize(r['image'], (nw, nh), interpolation=cv2.INTER_LINEAR)
    assert b['images'].dtype == np.uint8  # the inference program's input
    np.testing.assert_array_equal(b['images'][i, :nh, :nw], ref)
    assert not b['images'][i, nh:].any() and not b['images'][i, :, nw:].any()
    n = len(r['boxes'])
    np.testing.assert_allclose(b['gt_boxes'][i, :n],
                               r['boxes'] * ([nw / w, nh / h] * 2), rtol=1e-5)
  gt = ds.coco_gt()
  assert len(gt['images']) == 13 and gt['categories'][0]['id'] == 1


def test_coco_dir_source_with_unreadable_image(tmp_path, cfg):
  syn = SyntheticSource(seed=0, split='train', num_images=16, size=128,
                        num_classes=8, max_objects=4)
  root = str(tmp_path)
  write_coco_folder(syn, out_dir=root, image_dir='train2017',
                    ann_file='annotations/instances_train2017.json')
  with open(os.path.join(root, 'train2017', '000000000003.png'), 'wb') as f:
    f.write(b'corrupt')
  c = load_config('tiny', {'data.source': 'coco_dir', 'data.coco_dir': root,
                           'train.global_batch_size': 8})
  ds = build_dataset(c, 'train')
  assert len(ds) == 16
  it = make_train_iterator(c, seed=0, dataset=ds, num_workers=0)
  ids = []
  for _ in range(2):  # a whole epoch: no crash, a replacement is read
    b = next(it)
    _check_contract(b, c, 8)
    assert b['sample_valid'].all()
    ids.extend(b['image_ids'].tolist())
  assert ds.stats['unreadable_images'] >= 1
  ev = list(make_eval_iterator(c, batch_size=8, split='train', dataset=ds,
                               num_workers=0))
  valid = np.concatenate([b['sample_valid'] for b in ev])
  assert valid.sum() == 15


def test_grain_workers_match_in_process(cfg, train_ds):
  a = make_train_iterator(cfg, seed=5, start_step=3, dataset=train_ds,
                          num_workers=0)
  b = make_train_iterator(cfg, seed=5, start_step=3, dataset=train_ds,
                          num_workers=2)
  try:
    for _ in range(8):  # crosses two epoch boundaries (5 steps / epoch)
      x, y = next(a), next(b)
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert b.get_state() == {'step': 11}
  finally:
    b.close()


def test_eval_exact_canvas(cfg):
  c = load_config('tiny', {'data.synthetic_num_eval': 5,
                           'data.eval_canvas': 'exact'})
  for b in make_eval_iterator(c, batch_size=1, num_workers=0):
    assert tuple(b['images'].shape[1:3]) == tuple(b['img_shapes'][0])
    assert not b['pad_mask'].any()
  c = load_config('tiny', {'data.synthetic_num_eval': 5,
                           'data.eval_canvas': 'exact',
                           'data.pad_size_divisor': 32})
  for b in make_eval_iterator(c, batch_size=2, num_workers=0):
    h, w = b['images'].shape[1:3]
    assert h % 32 == 0 and w % 32 == 0
    assert h - 32 < b['img_shapes'][:, 0].max() <= h


def test_unknown_sizes_never_crash():
  c = load_config('tiny', {'train.global_batch_size': 8})
  ds = SyntheticSource(seed=0, split='train', num_images=32, size=128,
                       num_classes=8, max_objects=4)
  ds.sizes = None  # like TFDS without a size index: no grouping
  it = make_train_iterator(c, seed=0, dataset=ds, num_workers=0)
  for _ in range(4):
    b = next(it)
    _check_contract(b, c, 8)
    assert b['sample_valid'].sum() >= 4
    assert np.all(b['image_ids'][~b['sample_valid']] == -1)
  big = make_train_iterator(c, seed=0, dataset=ds, num_workers=0,
                            process_index=0, process_count=2)
  assert big.__next__()['images'].shape[1:3] in ((160, 128), (128, 160))
