"""The reference fixtures' names for the model's tensors: one table.

The detector sows each stage's typed output under the stage's name
(``model/outputs.py``: 'encoded', 'proposals', 'selection', 'denoising',
'decoded', 'outputs').  The fixtures (``infer.npz`` / ``train.npz`` of a
bundle, made by the reference) name the same tensors as mmdetection's code
does.  ``FIXTURE_NAMES`` maps one onto the other; ``fixture_tensors``
applies it (inside or outside ``jax.jit``):

    _, state = model.apply(variables, images, pad_mask, ...,
                           mutable=[INTERMEDIATES])
    ours = fixture_tensors(state[INTERMEDIATES])   # {'memory': ..., ...}

Each row: fixture name -> (a dotted path into the intermediates, a view).
A name with ``{i}`` is one fixture tensor per entry along the first axis
(levels, decoder layers).  Rows whose source the run did not produce
(training-only stages at inference, detections without ``img_shapes``)
are left out.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np


def _nchw(x):
  """Our NHWC feature map in the reference's NCHW layout."""
  return x.transpose(0, 3, 1, 2)


def _int32(x):
  return np.asarray(x, np.int32)


def _same(x):
  return x


# fixture name: (path into the intermediates, view)
FIXTURE_NAMES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    # forward_encoder
    'backbone_feat_{i}': ('encoded.backbone_feats', _nchw),
    'neck_feat_{i}': ('encoded.neck_feats', _nchw),
    'feat_mask': ('encoded.inputs.mask_flatten', _same),
    'feat_pos': ('encoded.inputs.lvl_pos_embed_flatten', _same),
    'valid_ratios': ('encoded.inputs.valid_ratios', _same),
    'spatial_shapes': ('encoded.inputs.spatial_shapes', _int32),
    'level_start_index': ('encoded.inputs.level_start_index', _int32),
    'memory_mask': ('encoded.inputs.mask_flatten', _same),
    'memory': ('encoded.memory', _same),
    # encoder_outputs
    'output_memory': ('proposals.output_memory', _same),
    'output_proposals': ('proposals.output_proposals', _same),
    # pre_decoder
    'topk_indices': ('selection.distinct.indices', _same),
    'num_kept_after_nms': ('selection.distinct.num_kept', _same),
    'nms_cut': ('selection.distinct.cut', _same),
    'dense_topk_indices': ('selection.dense.indices', _same),
    'decoder_query_in': ('selection.query', _same),
    'decoder_reference_in': ('selection.reference_points', _same),
    'head_in_enc_outputs_class': ('outputs.encoder.cls_logits', _same),
    'head_in_enc_outputs_coord': ('outputs.encoder.boxes', _same),
    'head_in_aux_enc_outputs_class': ('outputs.encoder.dense_cls_logits',
                                      _same),
    'head_in_aux_enc_outputs_coord': ('outputs.encoder.dense_boxes', _same),
    # denoising queries (training)
    'self_attn_mask_in': ('denoising.attn_mask', _same),
    'dn_meta_num_denoising_queries': ('outputs.denoising.num_queries', _same),
    'dn_meta_num_denoising_groups': ('outputs.denoising.num_groups', _same),
    'dn_meta_num_dense_queries': ('outputs.layout.num_dense', _int32),
    # decoder and head
    'hidden_states': ('decoded.hidden_states', _same),
    'references': ('decoded.references', _same),
    'distinct_keep_{i}': ('decoded.distinct_keep', _same),
    'head_query_mask_{i}': ('decoded.head_query_mask', _same),
    'all_layers_cls_scores': ('outputs.cls_logits', _same),
    'all_layers_bbox_preds': ('outputs.boxes', _same),
    # post-processing (inference with img_shapes)
    'det_bboxes': ('outputs.detections.boxes', _same),
    'det_scores': ('outputs.detections.scores', _same),
    'det_labels': ('outputs.detections.labels', _same),
    'det_valid': ('outputs.detections.valid', _same),
}


def _lookup(tree: Any, path: str) -> Optional[Any]:
  """``tree['a'].b.c`` for 'a.b.c' (mappings by key, else attributes);
  None when a step is absent."""
  node = tree
  for key in path.split('.'):
    if node is None:
      return None
    if hasattr(node, 'keys'):
      node = node[key] if key in node else None
    else:
      node = getattr(node, key, None)
  return node


def fixture_tensors(intermediates: Any) -> dict[str, Any]:
  """{fixture name: tensor} of the detector's sown stage outputs
  (``state['intermediates']``), every row of ``FIXTURE_NAMES`` whose
  source is present."""
  out = {}
  for name, (path, view) in FIXTURE_NAMES.items():
    value = _lookup(intermediates, path)
    if value is None:
      continue
    if '{i}' in name:
      for i in range(len(value)):
        out[name.format(i=i)] = view(value[i])
    else:
      out[name] = view(value)
  return out
