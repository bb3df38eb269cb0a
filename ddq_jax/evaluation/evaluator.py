"""Model evaluation: the inference program (``serve.detect``, the one that
``predict``, ``Detector`` and ``export`` run) over static eval batches of
uint8 canvases, sharded over the mesh's 'data' axis (``parallel/``: the
same mesh and partition rules as training), COCO box metrics on the host.

    detect = jit_detect_fn(config)
    metrics, dets = evaluate_model(detect, variables, dataset, config=config)
    # or: evaluate_model(detect, variables, make_eval_iterator(config, ...))

This is what the training loop's periodic evaluation calls.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import jax
from jax.sharding import Mesh
import numpy as np
from tqdm import tqdm

from ddq_jax.compilation_cache import compile_count
from ddq_jax.data import build_dataset, make_eval_iterator
from ddq_jax.evaluation.coco_metrics import (coco_box_metrics,
                                             detections_to_coco, format_table)
from ddq_jax.serve.detect import jit_detect_fn
from ddq_jax.train.parallel import mesh as mesh_lib
from ddq_jax.train.parallel import sharding as shd
from ddq_jax.train.parallel.mesh import DATA

log = logging.getLogger('ddq_jax.evaluation')

# The eval batch's arrays the inference program takes: uint8 canvases,
# image sizes (h, w), scale factors (w, h).
_INPUTS = ('images', 'img_shapes', 'scale_factors')


def _data_axis_size(mesh: Mesh) -> int:
  if DATA not in mesh.axis_names:
    raise ValueError(f"mesh {dict(mesh.shape)} has no 'data' axis")
  return int(mesh.shape[DATA])


def pad_batch(batch: dict, multiple: int) -> dict:
  """Pads the leading axis to a multiple of ``multiple`` with padding
  samples (copies of row 0 with sample_valid False, image_ids -1)."""
  b = len(batch['sample_valid'])
  extra = -b % multiple
  if not extra:
    return batch
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = np.concatenate([v, np.repeat(v[:1], extra, axis=0)], axis=0)
  out['sample_valid'][b:] = False
  out['image_ids'][b:] = -1
  return out


def _put_batch(batch: dict, mesh: Mesh) -> tuple:
  """Process-local numpy inputs -> global jax.Arrays split on 'data'."""
  inputs = {k: np.asarray(batch[k]) for k in _INPUTS}
  inputs['scale_factors'] = inputs['scale_factors'].astype(np.float32)
  put = shd.shard_batch(inputs, mesh)
  return tuple(put[k] for k in _INPUTS)


def _source_of(data) -> Any:
  """The DetectionSource behind an EvalIterator (or ``data`` itself)."""
  if hasattr(data, 'coco_gt') and hasattr(data, 'category_ids'):
    return data
  fn = getattr(data, 'fn', None)
  src = getattr(fn, 'source', None)
  return src


def evaluate_model(detect_fn, variables: dict, data: Any, *,
                   config=None, mesh: Optional[Mesh] = None,
                   progress: bool = True, max_images: Optional[int] = None,
                   batch_size: Optional[int] = None, dataset: Any = None,
                   print_table: bool = True
                   ) -> tuple[dict[str, float], list[dict]]:
  """Runs ``detect_fn`` over an eval split and computes COCO box metrics.

  Args:
    detect_fn: ``fn(variables, images, image_sizes, scale_factors) ->
      Detections`` on uint8 canvases (``serve.detect.jit_detect_fn``; a
      plain function, e.g. ``make_detect_fn``'s, is wrapped in ``jax.jit``).
    variables: {'params', 'batch_stats'} (host or device arrays); they are
      replicated over the mesh.
    data: a DetectionSource (``build_dataset``; then ``config`` is needed to
      build the eval iterator) or an iterable of batches in the data contract
      (``make_eval_iterator``; every batch the same static B, the last one
      padded, padding rows have ``sample_valid`` False).
    config: the full config (data.*, eval.batch_size); only for a source.
    mesh: the ('data', 'model') mesh (``parallel.mesh.make_mesh``); default:
      every device on 'data'.  The batch is split over 'data' (B is padded
      to a multiple of its size); the variables take the partition rules of
      ``config.mesh`` (arrays already placed that way are not moved).
    progress: tqdm bar (images/s) on process 0.
    max_images: stop after about this many images (whole batches; metrics
      cover exactly the images that were run).
    batch_size: per-host batch for a source (default config.eval.batch_size).
    dataset: the source for category ids and ground truth when ``data`` is
      an iterator that does not expose it (EvalIterator does).
    print_table: print the pycocotools-style summary (process 0).
  Returns:
    (metrics, detections): metrics has the 12 COCO numbers 'AP', 'AP50',
    'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl'
    plus 'num_images' / 'image_ids' (the evaluated images, in the order
    they ran), 'num_dropped' / 'dropped_image_ids'
    (images that could not be read), 'num_detections', 'seconds' (the loop, compilation
    included), 'compile_s' / 'num_compiles' (one per canvas shape),
    'data_wait_s' (time blocked on the iterator) and 'images_per_s'
    (images / (seconds - compile_s)); detections is the COCO results list (dataset image and
    category ids, xywh original pixels), the same on every process.
  """
  source = dataset if dataset is not None else _source_of(data)
  if source is None:
    raise ValueError('evaluate_model: cannot find the dataset (category ids, '
                     'ground truth) of this iterator; pass dataset=')
  data = _as_iterator(data, source, config, batch_size)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config)
  multiple = max(1, _data_axis_size(mesh) // jax.process_count())
  if not (hasattr(detect_fn, 'jitted') or hasattr(detect_fn, 'lower')):
    detect_fn = jax.jit(detect_fn)
  variables = shd.place_tree(variables, mesh, config)
  main = jax.process_index() == 0
  run = _EvalRun(list(source.category_ids),
                 bar=tqdm(total=_expected_images(source, max_images),
                          unit='img', desc='eval', dynamic_ncols=True)
                 if progress and main else None)
  try:
    _run_batches(detect_fn, variables, data, mesh, run, multiple=multiple,
                 max_images=max_images)
  finally:
    if run.bar is not None:
      run.bar.close()
    if hasattr(data, 'close'):
      data.close()
  seconds = time.perf_counter() - run.t0
  metrics, detections = _metrics(run, source, seconds, max_images=max_images)
  if print_table and main:
    print(format_table(metrics))
    print(f'{metrics["num_images"]} images, {len(detections)} detections, '
          f'{seconds:.1f} s ({run.compile_s:.1f} s compiling '
          f'{run.compiles} shape(s), {run.data_s:.1f} s waiting for '
          f'data): {metrics["images_per_s"]:.2f} images/s excluding '
          'compilation')
  return metrics, detections


def _as_iterator(data, source, config, batch_size):
  """``data`` itself, or the eval iterator of a DetectionSource."""
  if not (hasattr(data, 'coco_gt') and not hasattr(data, '__next__')):
    return data
  if config is None:
    raise ValueError('evaluate_model: a dataset needs config= to build the '
                     'eval iterator (or pass make_eval_iterator(...))')
  bs = int(batch_size or config.eval.batch_size)
  return make_eval_iterator(config, batch_size=bs, dataset=source,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())


def _expected_images(source, max_images: Optional[int]) -> Optional[int]:
  """The progress bar's total: the split's size, at most ``max_images``."""
  total = None
  try:
    total = len(source)
  except TypeError:
    pass
  if max_images is not None:
    total = min(total, int(max_images)) if total else int(max_images)
  return total


class _EvalRun:
  """What an evaluation collects: the COCO results, the images seen and
  dropped (unreadable: sample_valid False, id kept), and the timings."""

  def __init__(self, category_ids: list, *, bar=None):
    self.category_ids = category_ids
    self.bar = bar
    self.detections: list[dict] = []
    self.seen: list[int] = []
    self.dropped: list[int] = []
    self.compile_s = self.data_s = 0.0
    self.compiles = 0
    self.t0 = time.perf_counter()

  def drain(self, item) -> None:
    """One batch's detections to the host, as COCO results."""
    out, ids, valid = item
    host = shd.to_host(out)
    self.detections.extend(detections_to_coco(
        host.boxes, host.scores, host.labels, host.valid,
        image_ids=ids, sample_valid=valid, category_ids=self.category_ids))
    ok = valid & (ids >= 0)
    self.seen.extend(int(i) for i in ids[ok])
    self.dropped.extend(int(i) for i in ids[~valid & (ids >= 0)])
    if self.bar is not None:
      self.bar.update(int(np.sum(ok)))
      el = time.perf_counter() - self.t0 - self.compile_s
      if el > 0:
        self.bar.set_postfix_str(f'{len(self.seen) / el:.2f} img/s '
                                 '(excl. compile)')


def _run_batches(detect_fn, variables, data, mesh: Mesh, run: _EvalRun, *,
                 multiple: int, max_images: Optional[int]) -> None:
  """``detect_fn`` over the batches of ``data`` (each padded to a
  ``multiple`` of rows); batch k's results reach the host while batch k+1
  computes."""
  pending, n_local = None, 0
  it = iter(data)
  while max_images is None or n_local < max_images:
    t = time.perf_counter()
    try:
      batch = next(it)
    except StopIteration:
      break
    run.data_s += time.perf_counter() - t
    batch = pad_batch(batch, multiple)
    ids = shd.host_allgather(np.asarray(batch['image_ids'], np.int64))
    valid = shd.host_allgather(np.asarray(batch['sample_valid'], bool))
    before, t = compile_count(detect_fn), time.perf_counter()
    out = detect_fn(variables, *_put_batch(batch, mesh))  # async dispatch
    if compile_count(detect_fn) != before:  # compiled at this dispatch
      run.compile_s += time.perf_counter() - t
      run.compiles += compile_count(detect_fn) - before
    n_local += int(np.sum(np.asarray(batch['sample_valid'])))
    if pending is not None:
      run.drain(pending)  # host work on batch k-1 overlaps batch k's compute
    pending = (out, ids, valid)
  if pending is not None:
    run.drain(pending)


def _metrics(run: _EvalRun, source, seconds: float, *,
             max_images: Optional[int]) -> tuple[dict, list[dict]]:
  """(COCO metrics + run figures, detections) over the images that ran
  (the first ``max_images``)."""
  seen, detections = run.seen, run.detections
  if max_images is not None and len(seen) > max_images:
    seen = seen[:int(max_images)]
    keep = set(seen)
    detections = [d for d in detections if d['image_id'] in keep]
  metrics = coco_box_metrics(source.coco_gt(), detections, image_ids=seen)
  run_s = seconds - run.compile_s
  ips = len(seen) / run_s if run_s > 0 else 0.0
  metrics.update(num_images=len(seen), image_ids=list(seen),
                 num_dropped=len(run.dropped),
                 dropped_image_ids=sorted(set(run.dropped)),
                 num_detections=len(detections),
                 seconds=round(seconds, 3),
                 compile_s=round(run.compile_s, 3),
                 num_compiles=run.compiles,
                 data_wait_s=round(run.data_s, 3),
                 images_per_s=round(ips, 3))
  return metrics, detections


def evaluate_on_split(config, variables, *, split: Optional[str] = None,
                      **kwargs) -> tuple[dict[str, float], list[dict]]:
  """Convenience: builds the detect fn and the split from ``config``."""
  source = build_dataset(config, split or config.data.eval_split)
  return evaluate_model(jit_detect_fn(config), variables, source,
                        config=config, **kwargs)
