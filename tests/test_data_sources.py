"""Sources: synthetic, COCO folder (round trip, bad inputs), TFDS adapter."""
import json
import logging
import os
import sys

import cv2
import numpy as np
import pytest

from ddq_jax.config import load_config
from ddq_jax.data import build_dataset, make_eval_iterator, make_train_iterator
from ddq_jax.data.coco_folder import CocoFolderSource, parse_coco_json
from ddq_jax.data.synthetic import (main, render_synthetic, SyntheticSource,
    write_coco_folder)
from ddq_jax.data.tfds_source import (COCO_CATEGORY_IDS, image_size_from_header,
    TfdsSource)


def _syn(n=6, split='train', seed=0):
  return SyntheticSource(seed=seed, split=split, num_images=n, size=96,
                         num_classes=8, max_objects=5)


def test_synthetic_deterministic():
  a, b = _syn(), _syn()
  for i in range(len(a)):
    ra, rb = a.load(i), b.load(i)
    np.testing.assert_array_equal(ra['image'], rb['image'])
    np.testing.assert_array_equal(ra['boxes'], rb['boxes'])
    np.testing.assert_array_equal(ra['labels'], rb['labels'])
  other = _syn(seed=1).load(0)['image']
  assert other.shape != a.load(0)['image'].shape or np.any(
      other != a.load(0)['image'])
  val = _syn(split='validation').load(0)['image']
  assert val.shape != a.load(0)['image'].shape or np.any(
      val != a.load(0)['image'])
  np.testing.assert_array_equal(a.sizes, [a.load(i)['image'].shape[:2]
                                          for i in range(len(a))])


def test_synthetic_boxes_are_exact_extents():
  labels_seen = set()
  for i in range(20):
    r = render_synthetic(seed=0, split='train', index=i, size=128,
                         num_classes=8, max_objects=6, return_masks=True)
    assert len(r['boxes']) >= 1
    for box, m, lab in zip(r['boxes'], r['masks'], r['labels']):
      ys, xs = np.nonzero(m)
      # every drawn pixel inside the box, and the box is tight
      assert xs.min() == box[0] and xs.max() + 1 == box[2]
      assert ys.min() == box[1] and ys.max() + 1 == box[3]
      # the object's pixels differ from the background next to it
      labels_seen.add(int(lab))
    # objects do not overlap
    assert r['masks'].sum(0).max() <= 1
  assert len(labels_seen) >= 6


def test_coco_folder_round_trip(tmp_path):
  syn = _syn(n=5)
  img_dir, ann = write_coco_folder(syn, out_dir=str(tmp_path))
  src = CocoFolderSource(image_dir=img_dir, ann_file=ann)
  assert len(src) == len(syn)
  assert src.category_ids == syn.category_ids
  assert src.class_names == syn.class_names
  np.testing.assert_array_equal(src.image_ids, syn.image_ids)
  np.testing.assert_array_equal(src.sizes, syn.sizes)
  for i in range(len(src)):
    a, b = src.load(i), syn.load(i)
    np.testing.assert_array_equal(a['image'], b['image'])  # PNG: lossless
    np.testing.assert_allclose(a['boxes'], b['boxes'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
    assert a['image_id'] == b['image_id']
  gt = src.coco_gt()
  assert len(gt['images']) == 5
  assert len(gt['annotations']) == sum(len(syn.load(i)['boxes'])
                                       for i in range(5))
  ref = syn.coco_gt()
  assert [a['bbox'] for a in gt['annotations']] == [
      a['bbox'] for a in ref['annotations']]


def _write(tmp_path, data, name='ann.json'):
  p = tmp_path / name
  p.write_text(json.dumps(data))
  return str(p)


def test_non_coco_json_is_a_clear_error(tmp_path):
  p = _write(tmp_path, {'images': [], 'annotations': []})
  with pytest.raises(ValueError, match=r"ann\.json.*'categories'"):
    parse_coco_json(p)
  p = _write(tmp_path, [1, 2, 3], 'list.json')
  with pytest.raises(ValueError, match='list.json.*not an object'):
    parse_coco_json(p)
  (tmp_path / 'garbage.json').write_text('{not json')
  with pytest.raises(ValueError, match='garbage.json.*not valid JSON'):
    parse_coco_json(str(tmp_path / 'garbage.json'))
  p = _write(tmp_path, {'images': [{'id': 1}], 'annotations': [],
                        'categories': [{'id': 1}]}, 'noname.json')
  with pytest.raises(ValueError, match="noname.json.*images\\[0\\].*file_name"):
    parse_coco_json(p)
  with pytest.raises(FileNotFoundError, match='nope.json'):
    parse_coco_json(str(tmp_path / 'nope.json'))


def test_bad_annotations_and_images(tmp_path, caplog):
  img = np.full((40, 50, 3), 90, np.uint8)
  os.makedirs(tmp_path / 'im')
  for n in ('a.png', 'b.png', 'c.png'):
    cv2.imwrite(str(tmp_path / 'im' / n), img)
  (tmp_path / 'im' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff garbage')
  anns = [
      dict(id=1, image_id=1, category_id=3, bbox=[5, 5, 10, 10], area=100),
      dict(id=2, image_id=1, category_id=3, bbox=[40, 30, 20, 20], area=400),
      dict(id=3, image_id=1, category_id=3, bbox=[5, 5, 0, 10], area=0),
      dict(id=4, image_id=1, category_id=3, bbox=[60, 5, 5, 5], area=25),
      dict(id=5, image_id=1, category_id=99, bbox=[5, 5, 10, 10], area=100),
      dict(id=6, image_id=1, category_id=7, bbox=[1, 1, 30, 30], area=900,
           iscrowd=1),
      dict(id=7, image_id=2, category_id=7, bbox=[-5, -5, 10, 10], area=100),
      dict(id=8, image_id=42, category_id=7, bbox=[1, 1, 3, 3], area=9),
      dict(id=9, image_id=1, category_id=7, bbox=[1, 1, 5, 0.5], area=2.5),
  ]
  images = [dict(id=1, file_name='a.png', height=40, width=50),
            dict(id=2, file_name='b.png', height=40, width=50),
            dict(id=3, file_name='c.png', height=40, width=50),   # no anns
            dict(id=4, file_name='missing.png', height=40, width=50),
            dict(id=5, file_name='corrupt.jpg', height=40, width=50)]
  cats = [dict(id=7, name='seven'), dict(id=3, name='three')]
  p = _write(tmp_path, dict(images=images, annotations=anns, categories=cats))
  with caplog.at_level(logging.WARNING, logger='ddq_jax.data'):
    src = CocoFolderSource(image_dir=str(tmp_path / 'im'), ann_file=p)
  assert src.category_ids == [3, 7] and src.class_names == ['three', 'seven']
  assert src.stats['unknown_category'] == 1
  assert src.stats['unknown_image'] == 1
  assert src.stats['crowd'] == 1
  assert src.stats['invalid_box'] == 3  # zero width, outside, h < 1
  assert src.stats['missing_file'] == 1
  assert 'missing' in caplog.text
  assert list(src.image_ids) == [1, 2, 3, 5]
  r = src.load(0)
  np.testing.assert_allclose(r['boxes'], [[5, 5, 15, 15], [40, 30, 50, 40]])
  np.testing.assert_array_equal(r['labels'], [0, 0])
  r = src.load(1)
  np.testing.assert_allclose(r['boxes'], [[0, 0, 5, 5]])
  np.testing.assert_array_equal(r['labels'], [1])
  r = src.load(2)
  assert r['boxes'].shape == (0, 4) and r['image'].shape == (40, 50, 3)
  with caplog.at_level(logging.WARNING, logger='ddq_jax.data'):
    r = src.load(3)
  assert r['image'] is None and src.stats['unreadable_images'] == 1
  assert 'corrupt.jpg' in caplog.text
  gt = src.coco_gt()
  assert {im['id'] for im in gt['images']} == {1, 2, 3, 5}
  assert all(a['category_id'] in (3, 7) for a in gt['annotations'])


def test_min_size_filter(tmp_path):
  syn = _syn(n=3)
  img_dir, ann = write_coco_folder(syn, out_dir=str(tmp_path))
  src = CocoFolderSource(image_dir=img_dir, ann_file=ann, min_size=1000)
  assert len(src) == 0 and src.stats['small_image'] == 3


def _tfds_records(syn):
  recs = []
  for i in range(len(syn)):
    r = syn.load(i)
    h, w = r['image'].shape[:2]
    b = r['boxes']
    bbox = np.stack([b[:, 1] / h, b[:, 0] / w, b[:, 3] / h, b[:, 2] / w],
                    1).astype(np.float32)
    ok, enc = cv2.imencode('.png', r['image'][..., ::-1])
    assert ok
    recs.append({'image': enc.tobytes() if i % 2 else r['image'],
                 'image/id': np.int64(r['image_id']),
                 'image/filename': f'{i}.png'.encode(),
                 'objects': {'bbox': bbox,
                             'label': r['labels'].astype(np.int64),
                             'is_crowd': np.zeros(len(b), bool),
                             'area': np.zeros(len(b), np.int64),
                             'id': np.arange(len(b), dtype=np.int64)}})
  return recs


def test_tfds_adapter_on_fake_records():
  syn = _syn(n=4)
  recs = _tfds_records(syn)
  recs[2]['objects']['is_crowd'][0] = True
  src = TfdsSource(recs, category_ids=syn.category_ids,
                   class_names=syn.class_names)
  assert len(src) == 4 and src.sizes is None
  np.testing.assert_array_equal(src.image_ids, syn.image_ids)
  for i in range(4):
    a, b = src.load(i), syn.load(i)
    np.testing.assert_array_equal(a['image'], b['image'])
    keep = slice(1, None) if i == 2 else slice(None)
    np.testing.assert_allclose(a['boxes'], b['boxes'][keep], atol=1e-3)
    np.testing.assert_array_equal(a['labels'], b['labels'][keep])
    assert a['orig_size'] == b['image'].shape[:2]
  recs[1]['image'] = b'not an image'
  assert src.load(1)['image'] is None
  assert len(TfdsSource(recs).category_ids) == 80
  assert TfdsSource(recs).category_ids[-1] == COCO_CATEGORY_IDS[-1] == 90


def _prepare_fake_tfds(root, syn):
  """A tiny prepared TFDS dataset in coco/2017's layout, without TF."""
  tfds = pytest.importorskip('tensorflow_datasets')
  pytest.importorskip('array_record')
  names = list(syn.class_names)

  class FakeCocoForTest(tfds.core.GeneratorBasedBuilder,
                        skip_registration=True):
    VERSION = tfds.core.Version('1.1.0')

    def _info(self):
      features = tfds.features.FeaturesDict({
          'image': tfds.features.Image(encoding_format='jpeg'),
          'image/filename': tfds.features.Text(),
          'image/id': np.int64,
          'objects': tfds.features.Sequence({
              'id': np.int64, 'area': np.int64,
              'bbox': tfds.features.BBoxFeature(),
              'label': tfds.features.ClassLabel(names=names),
              'is_crowd': np.bool_})})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'validation': self._generate_examples()}

    def _generate_examples(self):
      for i in range(len(syn)):
        r = syn.load(i)
        h, w = r['image'].shape[:2]
        b = r['boxes']
        path = os.path.join(root, f'{i}.jpg')
        cv2.imwrite(path, r['image'][..., ::-1])
        yield i, {'image': path, 'image/filename': f'{i}.jpg',
                  'image/id': r['image_id'],
                  'objects': [{'id': k, 'area': 1, 'is_crowd': False,
                               'label': int(r['labels'][k]),
                               'bbox': tfds.features.BBox(
                                   b[k, 1] / h, b[k, 0] / w,
                                   b[k, 3] / h, b[k, 2] / w)}
                              for k in range(len(b))]}

  builder = FakeCocoForTest(data_dir=os.path.join(root, 'data'),
                            file_format='array_record')
  builder.download_and_prepare()
  return builder.name


def test_tfds_prepared_directory_without_tensorflow(tmp_path):
  syn = _syn(n=5, split='validation')
  name = _prepare_fake_tfds(str(tmp_path), syn)
  c = load_config('tiny', {'data.source': 'tfds', 'data.tfds_name': name,
                           'data.tfds_data_dir': str(tmp_path / 'data')})
  ds = build_dataset(c, 'validation')
  assert 'tensorflow' not in sys.modules
  assert len(ds) == 5 and ds.class_names == syn.class_names
  assert ds.category_ids == syn.category_ids
  assert sorted(ds.image_ids.tolist()) == syn.image_ids.tolist()
  for i in range(5):
    a = ds.load(i)
    j = int(np.nonzero(syn.image_ids == a['image_id'])[0][0])
    b = syn.load(j)
    # decoded like mmcv: cv2.imdecode(IMREAD_COLOR) of the stored JPEG
    ref = cv2.imread(str(tmp_path / f'{j}.jpg'), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(a['image'], ref)
    np.testing.assert_allclose(a['boxes'], b['boxes'], atol=1e-3)
    np.testing.assert_array_equal(a['labels'], b['labels'])
  batches = list(make_eval_iterator(c, batch_size=2, dataset=ds,
                                    num_workers=0))
  ids = np.concatenate([x['image_ids'] for x in batches])
  assert sorted(ids[ids >= 0].tolist()) == syn.image_ids.tolist()


def test_image_size_from_header():
  img = np.zeros((37, 53, 3), np.uint8)
  for ext in ('.jpg', '.png'):
    ok, enc = cv2.imencode(ext, img)
    assert ok and image_size_from_header(enc.tobytes()) == (37, 53)
  assert image_size_from_header(b'garbage') is None


def test_tfds_size_index_enables_grouping(tmp_path):
  syn = _syn(n=8, split='validation')
  name = _prepare_fake_tfds(str(tmp_path), syn)
  index = str(tmp_path / 'idx' / 'sizes_{split}.npz')
  c = load_config('tiny', {'data.source': 'tfds', 'data.tfds_name': name,
                           'data.tfds_data_dir': str(tmp_path / 'data'),
                           'data.tfds_index_file': index,
                           'data.train_split': 'validation',
                           'train.global_batch_size': 4})
  ds = build_dataset(c, 'validation')
  assert os.path.isfile(index.format(split='validation'))
  for i in range(len(ds)):
    assert tuple(ds.sizes[i]) == ds.load(i)['image'].shape[:2]
  again = build_dataset(c, 'validation')  # loads the saved index
  np.testing.assert_array_equal(again.sizes, ds.sizes)
  np.testing.assert_array_equal(again.image_ids, ds.image_ids)
  it = make_train_iterator(c, seed=0, dataset=ds, num_workers=0,
                           process_index=1, process_count=2)
  b = next(it)
  assert b['images'].shape[0] == 2 and b['sample_valid'].all()


def test_synthetic_cli_writes_standard_coco_layout(tmp_path, capsys):
  main([str(tmp_path), '--num', '3', '--split', 'validation', '--size', '64'])
  assert 'wrote 3 images' in capsys.readouterr().out
  c = load_config('tiny', {'data.source': 'coco_dir',
                           'data.coco_dir': str(tmp_path)})
  ds = build_dataset(c, 'validation')
  assert len(ds) == 3 and ds.ann_file.endswith('instances_val2017.json')
