"""COCO folders with bad data, validated at start-up: duplicate / non-integer
ids, missing sizes, missing files, categories the model cannot predict."""
import json
import logging
import os

import cv2
import numpy as np
import pytest

from ddq_jax.data.class_names import COCO_CATEGORY_IDS, COCO_CLASSES
from ddq_jax.data.coco_folder import CocoFolderSource, parse_coco_json
from ddq_jax.data.image_size import image_size
from ddq_jax.evaluation.coco_metrics import coco_box_metrics, detections_to_coco
from ddq_jax.serve.drawing import drawing_paths


def _folder(tmp_path, *, n=4, sizes=True, ids=None, cats=None, ext='png'):
  """n images of varying shape, one box each; returns (image_dir, data)."""
  d = tmp_path / 'im'
  d.mkdir(exist_ok=True)
  images, anns = [], []
  cats = cats or [dict(id=1, name='a'), dict(id=2, name='b'),
                  dict(id=3, name='c')]
  for i in range(n):
    h, w = (40, 60) if i % 2 else (64, 48)
    name = f'img{i}.{ext}'
    cv2.imwrite(str(d / name), np.full((h, w, 3), 30 * i, np.uint8))
    im = dict(id=(ids[i] if ids else i + 1), file_name=name)
    if sizes:
      im.update(height=h, width=w)
    images.append(im)
    anns.append(dict(id=i + 1, image_id=im['id'],
                     category_id=cats[i % len(cats)]['id'],
                     bbox=[2, 3, 20, 30], area=600, iscrowd=0))
  return str(d), dict(images=images, annotations=anns, categories=cats)


def _write(tmp_path, data):
  p = tmp_path / 'ann.json'
  p.write_text(json.dumps(data))
  return str(p)


def test_duplicate_image_ids_stop(tmp_path):
  d, data = _folder(tmp_path, ids=[1, 2, 4, 4])
  p = _write(tmp_path, data)
  with pytest.raises(ValueError, match=r'ann\.json: images\[\]\.id: 1 '
                     r'duplicate ids \(first: 4 at images\[2\] and '
                     r'images\[3\]\)'):
    CocoFolderSource(image_dir=d, ann_file=p)


def test_non_integer_ids_stop(tmp_path):
  d, data = _folder(tmp_path, ids=['a', 'b', 'c', 'd'])
  p = _write(tmp_path, data)
  with pytest.raises(ValueError, match=r"ann\.json: images\[\]\.id: 4 of 4 "
                     r"are not integers \(first: images\[0\]\.id = 'a'\)"):
    parse_coco_json(p)
  d, data = _folder(tmp_path)
  data['annotations'][1]['category_id'] = '2'
  with pytest.raises(ValueError, match=r'annotations\[\]\.category_id: 1 of '
                     r"4 are not integers \(first: annotations\[1\]"):
    parse_coco_json(_write(tmp_path, data))


@pytest.mark.parametrize('ext', ['png', 'jpg'])
def test_missing_sizes_read_from_the_files(tmp_path, caplog, ext):
  d, data = _folder(tmp_path, n=6, sizes=False, ext=ext)
  with caplog.at_level(logging.WARNING, logger='ddq_jax.data'):
    src = CocoFolderSource(image_dir=d, ann_file=_write(tmp_path, data))
  assert len(src) == 6 and src.sizes is not None
  np.testing.assert_array_equal(
      src.sizes, [src.load(i)['image'].shape[:2] for i in range(6)])
  assert 'images[].height/width: missing for 6 of 6 images; read from' in (
      caplog.text)
  assert src.stats['sizes_read'] == 6


def test_image_size_header_matches_decode(tmp_path):
  for ext, params in (('png', []), ('jpg', [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
                      ('jpg', []), ('bmp', [])):
    p = str(tmp_path / f'x.{ext}')
    cv2.imwrite(p, np.zeros((37, 53, 3), np.uint8), params)
    assert image_size(p) == (37, 53), ext
  assert image_size(str(tmp_path / 'absent.png')) is None


def test_missing_files_dropped_with_one_line_or_stop(tmp_path, caplog):
  d, data = _folder(tmp_path, n=4)
  os.remove(os.path.join(d, 'img1.png'))
  with caplog.at_level(logging.WARNING, logger='ddq_jax.data'):
    src = CocoFolderSource(image_dir=d, ann_file=_write(tmp_path, data))
  assert list(src.image_ids) == [1, 3, 4]
  assert "images[].file_name: 1 of 4 image files missing" in caplog.text
  assert "'img1.png'" in caplog.text
  for n in os.listdir(d):
    os.remove(os.path.join(d, n))
  with pytest.raises(ValueError, match=r'images\[\]\.file_name: all 4 image '
                     'files are missing'):
    CocoFolderSource(image_dir=d, ann_file=_write(tmp_path, data))


def test_categories_vs_model_classes(tmp_path, caplog):
  coco = [dict(id=COCO_CATEGORY_IDS[j], name=COCO_CLASSES[j])
          for j in (0, 2, 16)]  # person, car, dog
  d, data = _folder(tmp_path, n=3, cats=coco)
  p = _write(tmp_path, data)
  with caplog.at_level(logging.WARNING, logger='ddq_jax.data'):
    src = CocoFolderSource(image_dir=d, ann_file=p,
                           model_class_names=COCO_CLASSES)
  assert ("categories: 3 categories for a 80-class model: mapped by name "
          "onto model labels ('person' -> 0, 'car' -> 2, 'dog' -> 16)"
          in caplog.text)
  assert [int(src.load(i)['labels'][0]) for i in range(3)] == [0, 2, 16]
  assert src.category_ids[16] == 18 and src.category_ids[1] == -1
  assert len(src.category_ids) == 80

  # The metrics see the right categories: perfect detections -> AP 1, and
  # a confident detection of a class with no category changes nothing.
  boxes = np.zeros((3, 2, 4), np.float32)
  boxes[:, :] = [2, 3, 22, 33]
  labels = np.array([[0, 5], [2, 5], [16, 5]])
  dets = detections_to_coco(
      boxes, np.array([[0.9, 0.99]] * 3), labels, np.ones((3, 2), bool),
      image_ids=src.image_ids, sample_valid=np.ones(3, bool),
      category_ids=src.category_ids)
  m = coco_box_metrics(src.coco_gt(), dets)
  assert m['AP'] == pytest.approx(1.0)

  other = [dict(id=1, name='widget'), dict(id=2, name='car')]
  d, data = _folder(tmp_path, n=2, cats=other)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='ddq_jax.data'):
    rank = CocoFolderSource(image_dir=d, ann_file=_write(tmp_path, data),
                            model_class_names=COCO_CLASSES)
  assert rank.category_ids == [1, 2]
  assert ("2 categories for a 80-class model and 1 names are not model "
          "classes (first: 'widget'): category i (by id) is model label i; "
          "model labels 2..79 have no category" in caplog.text)
  with pytest.raises(ValueError, match=r'categories: 2 categories for a '
                     r'1-class model: 1 categories cannot be predicted; set '
                     r'--config.num_classes=2'):
    CocoFolderSource(image_dir=d, ann_file=_write(tmp_path, data),
                     model_class_names=('car',))
  same = CocoFolderSource(image_dir=d, ann_file=_write(tmp_path, data),
                          model_class_names=('x', 'y'))
  assert same.category_ids == [1, 2]  # same count: by category id rank


def test_drawing_names_are_unique_and_never_overwrite(tmp_path):
  d = tmp_path / 'draw'
  d.mkdir()
  (d / 'b.png').write_bytes(b'earlier drawing')
  got = drawing_paths(['x/a.jpg', 'y/a.png', 'a.jpeg', 'b.jpg', 'z/b.jpg'],
                      str(d))
  assert [os.path.basename(p) for p in got] == [
      'a.png', 'a-2.png', 'a-3.png', 'b-2.png', 'b-3.png']
  assert (d / 'b.png').read_bytes() == b'earlier drawing'
