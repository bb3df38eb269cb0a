"""How the encoder's distinct-query selection meets its static candidate
bound, per image of a verify bundle or of a weights + image set.

    python benchmarks/encoder_selection.py tests/data/published/r50_4scale_coco
    python benchmarks/encoder_selection.py tests/data/tiny --weights runs/smoke

Prints one JSON line per image: proposals, invalid proposals (padding or
centre outside (0.01, 0.99)), how many of the top ``nms_pre_topk`` by score
are invalid (the candidates before invalid proposals were collapsed into
one), NMS survivors among today's candidates, distinct queries kept
(at most ``num_queries``) and whether the bound may have cut (``cut``).
"""
import argparse
import json
import os
import sys

import numpy as np


def selection_stats(model, variables, images, pad_mask) -> list[dict]:
  """Per image: the figures above (the model's inference forward)."""
  import jax
  from ddq_jax.model.detector import DDQDETR, INTERMEDIATES

  def fn(v, x, m):
    _, st = model.apply(v, x, m, mutable=[INTERMEDIATES])
    inter = st[INTERMEDIATES]
    cls, _ = model.apply(v, inter['output_memory'], inter['output_proposals'],
                         method=DDQDETR.encoder_branches)
    return (jax.nn.sigmoid(cls.max(-1)), inter['output_proposals'],
            inter['num_kept_after_nms'], inter['topk_indices'],
            inter['nms_cut'])
  scores, props, kept, topk, cut = jax.device_get(
      jax.jit(fn)(variables, images, pad_mask))
  c = model.config
  rows = []
  for i in range(scores.shape[0]):
    invalid = ~np.isfinite(props[i]).all(-1)
    order = np.argsort(-scores[i], kind='stable')[:c.nms_pre_topk]
    rows.append(dict(
        image=i, proposals=int(scores.shape[1]), invalid=int(invalid.sum()),
        invalid_in_top_k=int(invalid[order].sum()), top_k=int(len(order)),
        survivors_among_candidates=int(kept[i]),
        distinct_kept=int((topk[i] >= 0).sum()),
        num_queries=int(c.num_queries), cut=bool(cut[i])))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('bundle', help="a verify bundle (its inputs.npz's images, "
                 'and its weights unless --weights)')
  p.add_argument('--weights', help='other weights (any format '
                 'ddq_jax.io.weights.load_weights reads)')
  a = p.parse_args(argv)
  from ddq_jax.parity import verify
  from ddq_jax.model.detector import build_model
  inputs = verify.bundle_inputs(verify._load_npz(  # pylint: disable=protected-access
      os.path.join(a.bundle, 'inputs.npz')))
  init = os.path.join(a.bundle, verify.INIT_JSON)
  if a.weights:
    from ddq_jax.io.weights import load_weights
    variables, config = load_weights(a.weights)
  elif os.path.isfile(init):
    variables, config = verify.init_weights(init)
  else:
    from ddq_jax.io.conversion.converter import convert_checkpoint
    variables, config, _ = convert_checkpoint(
        os.path.join(a.bundle, 'checkpoint.pth'))
  images, pad = inputs['images'], inputs['pad_mask']
  config.padding_invariant = False
  model = build_model(config)
  for row in selection_stats(model, variables, np.asarray(images, np.float32),
                             np.asarray(pad, bool)):
    print(json.dumps(row))
  return 0


if __name__ == '__main__':
  sys.exit(main())
