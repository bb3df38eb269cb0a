"""What the detector returns: typed, named structures (pytrees).

``DDQDETR.__call__`` returns one ``DetectorOutputs``; the criterion
(``losses/criterion.py``), post-processing, evaluation and ``predict`` read
its fields as they are, with no renaming on the way:

    out = model.apply(variables, images, pad_mask, img_shapes=...,
                      scale_factors=...)
    out.detections.boxes            # (B, M, 4) xyxy, original-image pixels
    out.cls_logits[-1]              # (B, Q, K) the last decoder layer

Query layout along Q (``QueryLayout``, static): ``[denoising | distinct |
dense]``; inference has only the distinct block.

Each stage hands the next a typed structure too, and the detector
``sow``s it into the ``'intermediates'`` collection under the stage's name
(only for a caller that asks: ``mutable=['intermediates']``, as ``verify``
does): 'encoded' (``EncoderState``), 'proposals' (``Proposals``),
'selection' (``query_selection.QuerySelection``), 'denoising'
(``denoising.DenoisingQueries``, training), 'decoded'
(``decoder.DecoderOutputs``) and 'outputs' (``DetectorOutputs``).  The
reference fixtures' names for these tensors are one table,
``ddq_jax/parity/fixture_names.py``.
"""
from __future__ import annotations

from typing import Optional

import jax
from flax import struct

from ddq_jax.model.multiscale import MultiScaleInputs


@struct.dataclass
class QueryLayout:
  """Static sizes of the decoder's query blocks: Q = dn + distinct + dense."""
  num_dn: int = struct.field(pytree_node=False, default=0)
  num_distinct: int = struct.field(pytree_node=False, default=0)
  num_dense: int = struct.field(pytree_node=False, default=0)

  @property
  def distinct(self) -> slice:
    return slice(self.num_dn, self.num_dn + self.num_distinct)

  @property
  def dense(self) -> slice:
    return slice(self.num_dn + self.num_distinct,
                 self.num_dn + self.num_distinct + self.num_dense)

  @property
  def dn(self) -> slice:
    return slice(0, self.num_dn)


@struct.dataclass
class EncoderState:
  """``forward_encoder``: the backbone's and the neck's feature maps (NHWC,
  one per level), the flattened encoder inputs and the encoder's output
  ``memory`` (B, N, C)."""
  backbone_feats: tuple
  neck_feats: tuple
  inputs: MultiScaleInputs
  memory: jax.Array


@struct.dataclass
class Proposals:
  """``encoder_outputs``: ``memory_trans_norm(memory_trans_fc(.))`` of the
  masked memory (B, N, C) and the proposals (B, N, 4) inverse-sigmoid
  cxcywh (+inf where invalid) of ``gen_encoder_output_proposals``."""
  output_memory: jax.Array
  output_proposals: jax.Array


@struct.dataclass
class EncoderPredictions:
  """The two-stage proposals the head is trained on (``enc_loss_*`` and
  ``aux_enc_aux_loss_*``): class logits and sigmoid cxcywh boxes of the
  encoder's distinct top-k (B, Qd, .) and dense top-k (B, Nd, .; None in
  inference)."""
  cls_logits: jax.Array
  boxes: jax.Array
  dense_cls_logits: Optional[jax.Array] = None
  dense_boxes: Optional[jax.Array] = None


@struct.dataclass
class DenoisingTargets:
  """The denoising slots' layout, computed once by ``models/denoising.py``
  (``dn_layout``) and read by the denoising loss.

  num_groups () int32 and num_queries () int32 (the reference's
  ``num_denoising_groups`` / ``num_denoising_queries``); slot_in_range (D,)
  bool (the used prefix); gt_index (B, D) int32 (the ground-truth slot a
  denoising query reconstructs); positive (B, D) bool.
  """
  num_groups: jax.Array
  num_queries: jax.Array
  slot_in_range: jax.Array
  gt_index: jax.Array
  positive: jax.Array

  @classmethod
  def from_layout(cls, layout: dict) -> 'DenoisingTargets':
    """From ``models.denoising.dn_layout``'s dict."""
    return cls(num_groups=layout['num_groups'],
               num_queries=layout['num_denoising_queries'],
               slot_in_range=layout['slot_in_range'],
               gt_index=layout['slot_gt_index'], positive=layout['positive'])


@struct.dataclass
class Detections:
  """Post-processed detections of the last decoder layer.

  boxes (B, M, 4) xyxy (original-image pixels when scale factors were
  given), scores (B, M), labels (B, M) int32, valid (B, M) bool (False only
  when fewer than M (query, class) pairs were distinct), query_index (B, M)
  int32 (the distinct query each came from).
  """
  boxes: jax.Array
  scores: jax.Array
  labels: jax.Array
  valid: jax.Array
  query_index: jax.Array


@struct.dataclass
class DetectorOutputs:
  """One forward pass.

  cls_logits: (L, B, Q, K) per decoder layer, every query of ``layout``.
  boxes: (L, B, Q, 4) sigmoid normalised cxcywh.
  distinct_masks: (L - 1, B, num_distinct) bool, the queries the head
    counts as distinct after decoder layers 0 .. L-2 (row 0 of the inverted
    attention mask by default; see ``distinct_mask_semantics``).
  layout: the static query blocks.
  encoder: training only, the encoder proposals' predictions.
  denoising: training only, the denoising slots' targets.
  detections: inference with ``img_shapes``: post-processed detections.
  encoder_nms_cut: (B,) bool, True where the encoder NMS's static candidate
    bound (``nms_pre_topk``) may have dropped a distinct query the
    reference would keep (``ops.nms.TopKAfterNms.cut``).
  """
  cls_logits: jax.Array
  boxes: jax.Array
  distinct_masks: jax.Array
  layout: QueryLayout = struct.field(pytree_node=False,
                                     default_factory=QueryLayout)
  encoder: Optional[EncoderPredictions] = None
  denoising: Optional[DenoisingTargets] = None
  detections: Optional[Detections] = None
  encoder_nms_cut: Optional[jax.Array] = None
