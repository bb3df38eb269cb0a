"""ddq_jax.data: the input pipeline for training and evaluation.

Entry points (ddq_jax.data.pipeline)::

  build_dataset(config, split) -> DetectionSource
  make_train_iterator(config, *, seed, start_step=0, process_index=0,
                      process_count=1, dataset=None, num_workers=None)
      -> TrainIterator  (infinite; .step, .epoch, .steps_per_epoch,
                         .get_state() -> {'step': n}, .set_state(state))
  make_eval_iterator(config, *, batch_size, split=None, process_index=0,
                     process_count=1, dataset=None, num_workers=None)
      -> EvalIterator   (finite, len() = number of batches)

A DetectionSource (ddq_jax.data.base) has ``category_ids`` (contiguous label
-> dataset category id), ``class_names``, ``image_ids``, ``coco_gt()`` (a
COCO-format ground-truth dict for metrics) and ``ann_file`` (the instances
JSON path, or None).  Sources: ``config.data.source`` = 'synthetic'
(ddq_jax.data.synthetic, default for smoke runs and tests), 'coco_dir'
(ddq_jax.data.coco_folder), 'tfds' (ddq_jax.data.tfds_source).

The batch contract: a dict of numpy arrays, B = per-host batch size,
G = config.loss.max_gt, (H, W) = the smallest canvas in
config.data.canvas_sizes that fits every image of the *global* batch (so all
hosts agree and jit compiles once per canvas)::

  images         (B, H, W, 3) float32  RGB, (x - mean) / std, padding 0
                                       (evaluation: uint8 RGB, padding 0;
                                       the inference program normalises)
  pad_mask       (B, H, W)    bool     True = padding
  img_shapes     (B, 2)       int32    real (h, w) after resize / augmentation
  scale_factors  (B, 2)       float32  (w, h) = new / original of the (last)
                                       resize, as mmdet reports it
  orig_sizes     (B, 2)       int32    (h, w) of the decoded original image
  gt_boxes       (B, G, 4)    float32  xyxy pixels in img_shape space
  gt_labels      (B, G)       int32    contiguous 0..K-1
  gt_valid       (B, G)       bool     first n slots True (n <= G; more
                                       boxes than G: first G kept, warning)
  image_ids      (B,)         int64    the dataset's ids; -1 for padding
  sample_valid   (B,)         bool     False for padding samples (the end of
                                       the eval split, unreadable images)

Padding samples are the mean colour (0 after normalisation) filling the
whole canvas, with img_shapes = canvas, no boxes: nothing divides by zero.
With grain workers (num_workers > 0) the arrays arrive as grain
SharedMemoryArray (an np.ndarray subclass); call ``close()`` on an iterator
you abandon.  Typical use::

  it = make_train_iterator(config, seed=config.train.seed, start_step=step,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  batch = next(it); ...; ckpt_extra = it.get_state()   # {'step': n}
  ev = make_eval_iterator(config, batch_size=config.eval.batch_size,
                          process_index=..., process_count=...)
  gt = ev.source.coco_gt(); ids = ev.source.category_ids

Reference behaviour (mmdetection 3.3.0, DDQ configs): images decoded with
OpenCV (IMREAD_COLOR, BGR -> RGB); test: Resize((1333, 800), keep_ratio)
via mmcv.rescale_size + cv2.INTER_LINEAR on uint8; train: RandomFlip(0.5),
RandomChoice between RandomChoiceResize(train_scales) and
RandomChoiceResize(crop_scales) -> RandomCrop('absolute_range', crop_size,
allow_negative_crop=True) -> RandomChoiceResize(train_scales); boxes scaled,
clipped, boxes outside a crop dropped; crowd boxes dropped.
"""
from ddq_jax.data.eval_batches import make_eval_iterator
from ddq_jax.data.pipeline import build_dataset, make_train_iterator

__all__ = ['build_dataset', 'make_train_iterator', 'make_eval_iterator']
