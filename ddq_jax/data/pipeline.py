"""Datasets and training batches: build_dataset, make_train_iterator, and
the iterator both batch streams share (evaluation batches:
``data/eval_batches.py``; the batch contract is documented in
ddq_jax.data).

Training order is a pure function of (seed, epoch): a permutation of the
dataset, grouped like mmdet's AspectRatioBatchSampler by the orientation of
each sample's *augmented* shape (computed from metadata, vectorised: the
augmentation's random choices are uniforms drawn per (seed, epoch) for every
index, turned into parameters with the original size only),
cut into global batches of ``config.train.global_batch_size``; the leftovers
of both groups are concatenated and cut too (see TrainBatchFn.plan), the
final remainder is dropped, so every epoch has ``N // global_batch`` steps.  Host p of P reads slots
[p*B, (p+1)*B) of each global batch (B = global / P), and the canvas is the
smallest that fits the whole global batch, so every host agrees on shapes.
Batch ``step`` is a pure function of (seed, step, process_index): resuming
from a step reproduces the stream exactly.
"""
from __future__ import annotations

import functools
import os
import threading

from absl import flags
import grain
import numpy as np

from ddq_jax.data import transforms as T
from ddq_jax.data.base import DetectionSource, log
from ddq_jax.data.batching import collate, select_canvas
from ddq_jax.data.class_names import class_names_for
from ddq_jax.data.coco_folder import CocoFolderSource
from ddq_jax.data.synthetic import SyntheticSource
from ddq_jax.data.tfds_source import open_tfds_source, TfdsSource
from ddq_jax.data.workers import die_with_parent

_BIG = 2 ** 62
_COCO_SPLITS = {'train': 'train2017', 'validation': 'val2017',
                'val': 'val2017', 'test': 'test2017'}


def build_dataset(config, split: str) -> DetectionSource:
  """Builds the source for ``split`` from ``config.data``.

  source 'synthetic': SyntheticSource (train split: synthetic_num_train
  images, otherwise synthetic_num_eval). 'coco_dir': CocoFolderSource over
  ``coco_dir/<split>2017`` + ``coco_dir/annotations/instances_<split>2017.json``
  (train -> train2017, validation/val -> val2017), unless
  data.{train,eval}_image_dir / _ann_file are set; its categories are
  checked against (or mapped by name onto) the model's classes.  'tfds': TfdsSource over
  the prepared ``tfds_data_dir``.
  """
  d = config.data
  is_train = split == d.train_split
  if d.source == 'synthetic':
    return SyntheticSource(
        seed=d['synthetic_seed'], split=split,
        num_images=d.synthetic_num_train if is_train else d.synthetic_num_eval,
        size=d.synthetic_size,
        num_classes=min(d['synthetic_num_classes'],
                        config.num_classes),
        max_objects=d['synthetic_max_objects'])
  if d.source == 'coco_dir':
    sub = _COCO_SPLITS.get(split, split)
    prefix = 'train' if is_train else 'eval'
    image_dir = d[f'{prefix}_image_dir'] or os.path.join(
        d.coco_dir, sub)
    ann = d[f'{prefix}_ann_file'] or os.path.join(
        d.coco_dir, 'annotations', f'instances_{sub}.json')
    return CocoFolderSource(image_dir=image_dir, ann_file=ann,
                            min_size=d['train_min_size']
                            if is_train else 0,
                            model_class_names=class_names_for(config))
  if d.source == 'tfds':
    records, names = open_tfds_source(data_dir=d.tfds_data_dir,
                                      name=d.tfds_name, split=split)
    src = TfdsSource(records, class_names=names)
    src.ann_file = d['tfds_ann_file'] or None
    index = d['tfds_index_file']
    if index:
      src.load_index(index.format(split=split))
    return src
  raise ValueError(f"unknown data.source {d.source!r}: expected 'synthetic', "
                   "'coco_dir' or 'tfds'")


# ------------------------------------------------------------------ train


class TrainBatchFn:
  """step -> this host's batch.  Picklable (sent to grain workers)."""

  def __init__(self, source: DetectionSource, data_cfg, *, seed: int,
               global_batch: int, max_gt: int, process_index: int,
               process_count: int):
    if global_batch % process_count:
      raise ValueError(f'global batch {global_batch} is not divisible by '
                       f'{process_count} processes')
    if len(source) < global_batch:
      raise ValueError(f'dataset has {len(source)} images < global batch '
                       f'{global_batch}')
    self.source, self.seed, self.gb = source, int(seed), int(global_batch)
    self.b = global_batch // process_count
    self.p, self.pc, self.max_gt = process_index, process_count, max_gt
    self.scales = [tuple(s) for s in data_cfg.train_scales]
    self.crop_scales = [tuple(s) for s in data_cfg.crop_scales]
    self.crop_size = tuple(data_cfg.crop_size)
    self.canvases = [tuple(c) for c in data_cfg.canvas_sizes]
    self.mean, self.std = tuple(data_cfg.mean), tuple(data_cfg.std)
    self.sizes = source.sizes
    self.steps_per_epoch = len(source) // self.gb
    self._cache: dict = {}  # epoch -> (uniforms, shapes, plan); read-only
    self._lock = threading.Lock()

  def __getstate__(self):  # the lock and cache stay behind (workers)
    state = dict(self.__dict__)
    state['_cache'], state['_lock'] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _epoch(self, epoch: int) -> tuple:
    """Draws epoch ``epoch``'s uniforms and shapes, and its batch plan.

    Full batches of one orientation first (perm order), then the leftovers
    of both orientations concatenated and cut.  A mixed leftover batch that
    no canvas fits (no square canvas configured) has its minority-
    orientation samples replaced by the epoch's first samples of the
    majority orientation, so every batch fits a canvas.
    """
    with self._lock:  # grain may call from several threads per worker
      hit = self._cache.get(epoch)
    if hit is not None:
      return hit
    n = len(self.source)
    perm = np.random.default_rng([self.seed, epoch]).permutation(n)
    u = np.random.default_rng([self.seed, epoch, 1]).random(
        (n, T.NUM_UNIFORMS))
    if self.sizes is None:
      shapes, order = None, perm
    else:
      shapes = T.train_output_shapes(
          u, sizes=self.sizes, scales=self.scales,
          crop_scales=self.crop_scales, crop_size=self.crop_size)
      orient = (shapes[:, 1] < shapes[:, 0]).astype(np.int64)[perm]
      buckets, batches = ([], []), []
      for idx, o in zip(perm.tolist(), orient.tolist()):
        bucket = buckets[o]
        bucket.append(idx)
        if len(bucket) == self.gb:
          batches.extend(bucket)
          bucket.clear()
      left = buckets[0] + buckets[1]
      firsts = (perm[orient == 0].tolist(), perm[orient == 1].tolist())
      portrait = shapes[:, 1] < shapes[:, 0]
      for k in range(len(left) // self.gb):
        chunk = left[k * self.gb:(k + 1) * self.gb]
        try:
          select_canvas(shapes[chunk], canvas_sizes=self.canvases)
        except ValueError:
          o = int(portrait[chunk].sum() * 2 > len(chunk))
          repl = iter(firsts[o])
          chunk = [i if int(portrait[i]) == o else next(repl) for i in chunk]
        batches.extend(chunk)
      order = np.asarray(batches, np.int64)
    plan = np.asarray(order[:self.steps_per_epoch * self.gb],
                      np.int64).reshape(-1, self.gb)
    entry = (u, shapes, plan)
    with self._lock:
      self._cache[epoch] = entry
      for old in sorted(self._cache)[:-3]:  # keep the last three epochs
        del self._cache[old]
    return entry

  def plan(self, epoch: int) -> np.ndarray:
    """(steps_per_epoch, global_batch) dataset indices of ``epoch``."""
    return self._epoch(epoch)[2]

  def params(self, epoch: int, index: int, size_hw) -> T.TrainParams:
    return T.train_params_from_uniforms(
        self._epoch(epoch)[0][int(index)], size_hw=size_hw, scales=self.scales,
        crop_scales=self.crop_scales, crop_size=self.crop_size)

  def out_shape(self, epoch: int, index: int) -> tuple[int, int]:
    return tuple(int(v) for v in self._epoch(epoch)[1][int(index)])

  def _load(self, epoch: int, index: int, canvas) -> dict | None:
    r = self.source.load(int(index))
    if r['image'] is None:
      return None
    p = self.params(epoch, index, r['image'].shape[:2])
    out = T.apply_train_transform(r['image'], r['boxes'], r['labels'],
                                  params=p)
    h, w = out['image'].shape[:2]
    if canvas is not None and (h > canvas[0] or w > canvas[1]):
      log.warning('image %s (decoded %s) does not fit the canvas %s agreed '
                  'from metadata; replaced', r['image_id'],
                  r['image'].shape[:2], tuple(canvas))
      return None
    out.update(image_id=r['image_id'], orig_size=r['orig_size'])
    return out

  def __call__(self, step: int) -> dict:
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    gidx = self.plan(epoch)[pos]
    local = gidx[self.p * self.b:(self.p + 1) * self.b]
    if self.sizes is not None:
      canvas = select_canvas([self.out_shape(epoch, i) for i in gidx],
                             canvas_sizes=self.canvases)
    elif self.pc > 1:
      canvas = max(self.canvases, key=lambda c: (c[0] * c[1], c))
    else:
      canvas = None  # decided from the decoded local batch below
    samples, valid = [], []
    n = len(self.source)
    for idx in local:
      s = None
      for k in range(20):  # an unreadable image: the next readable one
        cand = (int(idx) + k * 7919) % n
        if k and self.sizes is not None and canvas is not None:
          h, w = self.out_shape(epoch, cand)
          if h > canvas[0] or w > canvas[1]:
            continue
        s = self._load(epoch, cand, canvas)
        if s is not None:
          break
      valid.append(s is not None)
      samples.append(s)
    if canvas is None:  # one host, sizes unknown: decoded shapes decide
      canvas = best_canvas([s['image'].shape[:2] for s in samples if s],
                            canvases=self.canvases)
      for i, s in enumerate(samples):
        if s is not None and (s['image'].shape[0] > canvas[0]
                              or s['image'].shape[1] > canvas[1]):
          log.warning('image %s fits no canvas with the rest of its batch '
                      '(add a square data.canvas_sizes entry); blanked',
                      s['image_id'])
          samples[i], valid[i] = None, False
    samples = [s if s is not None else blank_sample(canvas, self.mean)
               for s in samples]
    return collate(samples, canvas=canvas, max_gt=self.max_gt,
                   mean=self.mean, std=self.std, valid=valid)


def best_canvas(shapes, *, canvases) -> tuple[int, int]:
  """select_canvas, or if none fits all: the one fitting the most shapes."""
  try:
    return select_canvas(shapes or [(1, 1)], canvas_sizes=canvases)
  except ValueError:
    def score(c):
      fit = sum(h <= c[0] and w <= c[1] for h, w in shapes)
      return (-fit, c[0] * c[1])
    return tuple(min(canvases, key=score))


def blank_sample(canvas, mean) -> dict:
  """A padding sample: the mean colour (normalises to 0), no boxes."""
  img = np.broadcast_to(np.round(np.asarray(mean)).astype(np.uint8),
                        (int(canvas[0]), int(canvas[1]), 3)).copy()
  return dict(image=img, boxes=np.zeros((0, 4), np.float32),
              labels=np.zeros((0,), np.int32), img_shape=tuple(canvas),
              scale_factor=(1.0, 1.0), orig_size=tuple(canvas), image_id=-1)


class BatchIterator:
  """Runs ``fn`` over ``range(start, stop)`` (grain workers if > 0; they
  exit when this process dies, see ``die_with_parent``)."""

  def __init__(self, fn, *, start: int, stop: int, num_workers: int):
    self.fn, self.stop, self.num_workers = fn, stop, num_workers
    self.source = fn.source  # the DetectionSource (category ids, coco_gt)
    self.step = start
    self._it = None

  def _open(self):
    if self.num_workers <= 0:
      self._it = map(self.fn, range(self.step, self.stop))
      return
    if not flags.FLAGS.is_parsed():  # grain reads absl flags (pytest, scripts)
      flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(self.step, self.stop).map(self.fn)
    # Elements are whole batches (tens to hundreds of MB at full size):
    # keep grain's per-worker thread pool and read-ahead small.
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=2, prefetch_buffer_size=2)).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=self.num_workers,
                                     per_worker_buffer_size=2),
        worker_init_fn=functools.partial(die_with_parent, os.getpid()))
    self._it = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.step >= self.stop:
      raise StopIteration
    if self._it is None:
      self._open()
    batch = next(self._it)
    self.step += 1
    return batch

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, 'close'):
      it.close()


class TrainIterator(BatchIterator):
  """Infinite training iterator; position = the next step.

  ``source`` is the DetectionSource (category_ids, class_names, coco_gt).
  ``get_state()`` -> {'step': int}; ``set_state(state)`` moves to that step
  (checkpoint resume); ``epoch`` is the epoch of the next batch.
  """

  def __init__(self, fn: TrainBatchFn, *, start_step: int, num_workers: int):
    super().__init__(fn, start=start_step, stop=_BIG, num_workers=num_workers)
    self.steps_per_epoch = fn.steps_per_epoch

  @property
  def epoch(self) -> int:
    return self.step // self.steps_per_epoch

  def get_state(self) -> dict:
    return {'step': int(self.step)}

  def set_state(self, state: dict) -> None:
    self.close()
    self.step = int(state['step'])


def make_train_iterator(config, *, seed: int, start_step: int = 0,
                        process_index: int = 0, process_count: int = 1,
                        dataset: DetectionSource | None = None,
                        num_workers: int | None = None) -> TrainIterator:
  """Infinite iterator of this host's training batches.

  Args:
    config: the full config (data.*, train.global_batch_size, loss.max_gt).
    seed: shuffling / augmentation seed.
    start_step: global step of the first batch (resume).
    process_index, process_count: this host and the number of hosts
      (jax.process_index(), jax.process_count()); each host gets
      global_batch_size // process_count samples per step.
    dataset: an already built train source (default: build_dataset).
    num_workers: grain worker processes (default config.data.num_workers;
      0 runs in this process).
  Returns:
    TrainIterator yielding the batch contract with
    B = global_batch_size // process_count.
  """
  src = dataset if dataset is not None else build_dataset(
      config, config.data.train_split)
  fn = TrainBatchFn(src, config.data, seed=seed,
                    global_batch=config.train.global_batch_size,
                    max_gt=config.loss.max_gt, process_index=process_index,
                    process_count=process_count)
  nw = config.data.num_workers if num_workers is None else num_workers
  return TrainIterator(fn, start_step=start_step, num_workers=nw)
