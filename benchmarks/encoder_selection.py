"""How the encoder's distinct-query selection meets its static candidate
bound, per image of a verify bundle or of a weights + image set.

    python benchmarks/encoder_selection.py tests/data/published/r50_4scale_coco
    python benchmarks/encoder_selection.py tests/data/tiny --weights runs/smoke
    python benchmarks/encoder_selection.py --synthetic 8 --weights runs/smoke

Prints one JSON line per image: proposals, invalid proposals (padding or
centre outside (0.01, 0.99)), how many of the top ``nms_pre_topk`` by score
are invalid (the candidates before invalid proposals were collapsed into
one) and among the top ``num_queries``, the score rank of the first invalid
proposal (how many proposals score above their shared score), NMS survivors among today's candidates, distinct queries kept
(at most ``num_queries``) and whether the bound may have cut (``cut``).
"""
import argparse
import json
import os
import sys

import jax
import numpy as np

from ddq_jax.data.synthetic import render_synthetic
from ddq_jax.io.conversion.converter import convert_checkpoint
from ddq_jax.io.weights import load_weights
from ddq_jax.model.detector import DDQDETR, INTERMEDIATES, build_model
from ddq_jax.parity import verify


def selection_stats(model, variables, images, pad_mask) -> list[dict]:
  """Per image: the figures above (the model's inference forward)."""

  def fn(v, x, m):
    _, st = model.apply(v, x, m, mutable=[INTERMEDIATES])
    props, sel = st[INTERMEDIATES]['proposals'], st[INTERMEDIATES]['selection']
    cls, _ = model.apply(v, props.output_memory, props.output_proposals,
                         method=DDQDETR.encoder_branches)
    return (jax.nn.sigmoid(cls.max(-1)), props.output_proposals,
            sel.distinct.num_kept, sel.distinct.indices, sel.distinct.cut)
  scores, props, kept, topk, cut = jax.device_get(
      jax.jit(fn)(variables, images, pad_mask))
  c = model.config
  rows = []
  for i in range(scores.shape[0]):
    invalid = ~np.isfinite(props[i]).all(-1)
    ranked = np.argsort(-scores[i], kind='stable')
    order = ranked[:c.nms_pre_topk]
    first_invalid = np.flatnonzero(invalid[ranked])
    rows.append(dict(
        image=i, proposals=int(scores.shape[1]), invalid=int(invalid.sum()),
        invalid_in_top_k=int(invalid[order].sum()), top_k=int(len(order)),
        invalid_in_top_queries=int(invalid[ranked[:c.num_queries]].sum()),
        first_invalid_rank=int(first_invalid[0]) if first_invalid.size
        else None,
        survivors_among_candidates=int(kept[i]),
        distinct_kept=int((topk[i] >= 0).sum()),
        num_queries=int(c.num_queries), cut=bool(cut[i])))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('bundle', nargs='?', help="a verify bundle (its "
                 "inputs.npz's images, and its weights unless --weights)")
  p.add_argument('--synthetic', type=int, default=0, metavar='N',
                 help='instead of a bundle: the first N held-out synthetic '
                 "images of the weights' config (each side 3/4 to 1 of "
                 'data.synthetic_size), normalised and padded into one batch '
                 'on the largest canvas, as the reference batches them')
  p.add_argument('--weights', help='other weights (any format '
                 'ddq_jax.io.weights.load_weights reads)')
  a = p.parse_args(argv)
  if bool(a.bundle) == bool(a.synthetic):
    p.error('give a bundle or --synthetic N (with --weights)')
  if a.synthetic and not a.weights:
    p.error('--synthetic needs --weights')
  if a.synthetic:
    variables, config = load_weights(a.weights)
    images, pad = synthetic_batch(config, a.synthetic)
  else:
    images, pad, variables, config = bundle_batch(a.bundle, a.weights)
  config.padding_invariant = False
  model = build_model(config)
  for row in selection_stats(model, variables, np.asarray(images, np.float32),
                             np.asarray(pad, bool)):
    print(json.dumps(row))
  return 0


def synthetic_batch(config, n):
  """The first ``n`` images of the held-out synthetic split, normalised and
  zero-padded (after normalisation, as mmdet's data preprocessor) to the
  largest (h, w) among them: (images (n, H, W, 3), pad_mask (n, H, W))."""
  d = config.data
  imgs = [render_synthetic(seed=d.synthetic_seed, split=d.eval_split,
                           index=i, size=d.synthetic_size,
                           num_classes=d.synthetic_num_classes,
                           max_objects=d.synthetic_max_objects)['image']
          for i in range(n)]
  h = max(i.shape[0] for i in imgs)
  w = max(i.shape[1] for i in imgs)
  images = np.zeros((n, h, w, 3), np.float32)
  pad = np.ones((n, h, w), bool)
  mean, std = np.asarray(d.mean, np.float32), np.asarray(d.std, np.float32)
  for k, im in enumerate(imgs):
    images[k, :im.shape[0], :im.shape[1]] = (im - mean) / std
    pad[k, :im.shape[0], :im.shape[1]] = False
  return images, pad


def bundle_batch(bundle, weights):
  """A verify bundle's images and pad mask, and its weights (or
  ``weights``)."""
  inputs = verify.bundle_inputs(verify._load_npz(  # pylint: disable=protected-access
      os.path.join(bundle, 'inputs.npz')))
  init = os.path.join(bundle, verify.INIT_JSON)
  if weights:
    variables, config = load_weights(weights)
  elif os.path.isfile(init):
    variables, config = verify.init_weights(init)
  else:
      variables, config, _ = convert_checkpoint(
        os.path.join(bundle, 'checkpoint.pth'))
  return inputs['images'], inputs['pad_mask'], variables, config


if __name__ == '__main__':
  sys.exit(main())
