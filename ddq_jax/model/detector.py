"""DDQ-DETR: the root Flax module that assembles every part.

Reference: mmdet 3.3.0 ``detectors/ddq_detr.py`` (over DINO / DeformableDETR
/ DetectionTransformer).  Submodules carry the torch names (backbone, neck,
encoder, decoder, bbox_head, memory_trans_fc, memory_trans_norm, query_map,
dn_query_generator, param level_embed) so a converted checkpoint applies
directly: ``model.apply(variables, images, pad_mask, ...)``.

Flow (``__call__``): backbone -> neck -> multi-scale flatten (+ sine pos +
level embed, masks, valid ratios) -> deformable encoder -> pre_decoder
(two-stage proposals, class-agnostic NMS picks ``num_queries`` distinct
queries; in training also the dense top-k and the denoising queries) ->
DDQ decoder (per-layer distinct-query NMS) -> head forward -> (inference)
post-processing.  Returns a ``models.outputs.DetectorOutputs``; each
stage's typed output goes to the ``'intermediates'`` collection (``sow``)
under the stage's name, for callers that apply with
``mutable=['intermediates']`` (``model/outputs.py``; the reference
fixtures' names for them: ``ddq_jax/parity/fixture_names.py``).

Padding invariance (``config.padding_invariant``, inference only unless
asked for explicitly): each image's own extent is taken from ``pad_mask``
(top-left placement), the backbone zeroes activations outside it before
every space-mixing layer, the neck's GroupNorm counts only the extent,
level masks come from the unpadded map sizes, and padded positions do not
enter the encoder's top-k / NMS; an image on any canvas then gives its
batch-1 unpadded result (see docs/PADDING.md).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax.model.backbones import build_backbone
from ddq_jax.model.decoder import LN_EPS, DDQDecoder
from ddq_jax.model.denoising import CdnQueryGenerator
from ddq_jax.model.encoder import DeformableEncoder
from ddq_jax.model.head import DDQHead
from ddq_jax.model.layer_norm import LayerNorm
from ddq_jax.model import initializers as inits
from ddq_jax.model.extents import extent_valid, image_extents
from ddq_jax.model.multiscale import level_masks_from_extents, prepare_multiscale_inputs
from ddq_jax.model.neck import ChannelMapper
from ddq_jax.model import outputs as O
from ddq_jax.model.postprocess import predict_by_feat
from ddq_jax.model import query_selection
from ddq_jax.model.proposals import gen_encoder_output_proposals


INTERMEDIATES = 'intermediates'


def _keep_last(_, value):
  """``sow`` reduce: store the value itself (not a tuple of calls)."""
  return value


class DDQDETR(nn.Module):
  """The whole detector, from explicit fields: the stage modules (unbound;
  each takes the attribute's name, the torch one) and the sizes the root
  itself uses.  ``DDQDETR.from_config(config)`` (``build_model``) reads a
  config (tiny.py, ddq_r50_4scale.py) once; every size comes from it."""
  backbone: nn.Module
  neck: ChannelMapper
  encoder: DeformableEncoder
  decoder: DDQDecoder
  bbox_head: DDQHead
  dn_query_generator: CdnQueryGenerator
  embed_dims: int
  num_levels: int
  num_queries: int
  num_decoder_layers: int
  dense_topk_ratio: float
  nms_iou_threshold: float
  nms_pre_topk: int
  pos_temperature: float
  pos_offset: float
  max_per_img: int
  padding_invariant: bool = False

  @classmethod
  def from_config(cls, c) -> 'DDQDETR':
    """The detector of a config (``ddq_jax.config.load_config(...)``)."""
    return cls(
        backbone=build_backbone(c),
        neck=ChannelMapper.from_config(c),
        encoder=DeformableEncoder.from_config(c),
        decoder=DDQDecoder.from_config(c),
        bbox_head=DDQHead.from_config(c),
        dn_query_generator=CdnQueryGenerator(
            num_classes=int(c.num_classes), embed_dims=int(c.embed_dims),
            num_dn_queries=int(c.dn.num_dn_queries),
            label_noise_scale=float(c.dn.label_noise_scale),
            box_noise_scale=float(c.dn.box_noise_scale)),
        embed_dims=int(c.embed_dims), num_levels=int(c.num_levels),
        num_queries=int(c.num_queries),
        num_decoder_layers=int(c.num_decoder_layers),
        dense_topk_ratio=c.dense_topk_ratio,
        nms_iou_threshold=c.nms_iou_threshold,
        nms_pre_topk=c.nms_pre_topk, pos_temperature=c.pos_temperature,
        pos_offset=c.pos_offset, max_per_img=int(c.max_per_img),
        padding_invariant=bool(c.padding_invariant))

  def setup(self):
    # Init as DDQDETR.init_weights: memory_trans_fc weight xavier_uniform
    # (bias torch default); query_map is never re-initialised (torch
    # default Linear); level_embed normal_; the rest in the submodules.
    self.memory_trans_fc = nn.Dense(
        self.embed_dims, kernel_init=inits.xavier_uniform,
        bias_init=inits.torch_linear_bias(self.embed_dims))
    self.memory_trans_norm = LayerNorm(epsilon=LN_EPS)
    self.query_map = nn.Dense(
        self.embed_dims, kernel_init=inits.torch_linear_kernel,
        bias_init=inits.torch_linear_bias(self.embed_dims))
    self.level_embed = self.param('level_embed', inits.normal_std1,
                                  (self.num_levels, self.embed_dims))

  def expose(self, stage: str, value) -> None:
    """Sows a stage's typed output under the stage's name (a no-op unless
    the caller made ``'intermediates'`` mutable; see ``model/outputs.py``)."""
    self.sow(INTERMEDIATES, stage, value, reduce_fn=_keep_last,
             init_fn=lambda: None)

  @property
  def num_dense_queries(self) -> int:
    return query_selection.num_dense_queries(
        num_queries=self.num_queries,
        dense_topk_ratio=self.dense_topk_ratio)

  # ---- stages ------------------------------------------------------------
  def level_strides(self) -> tuple[int, ...]:
    """Stride of every transformer level: the backbone outputs', then x2
    per extra neck level."""
    strides = list(self.backbone.out_strides)
    while len(strides) < self.num_levels:
      strides.append(strides[-1] * 2)
    return tuple(strides)

  def forward_encoder(self, images: jnp.ndarray, pad_mask: jnp.ndarray, *,
                      invariant: bool = False) -> O.EncoderState:
    """Backbone, neck, flatten, encoder: the multi-scale inputs + memory.
    ``invariant``: padding-invariant mode."""
    masks = None
    if invariant:
      extents = image_extents(pad_mask)
      strides = self.level_strides()
      feats = self.backbone(images, extents)
      neck = self.neck(feats, lambda lvl, shape: extent_valid(
          extents, stride=strides[lvl], shape=shape))
      masks = level_masks_from_extents(
          extents, strides=strides,
          spatial_shapes=[f.shape[1:3] for f in neck])
    else:
      feats = self.backbone(images)
      neck = self.neck(feats)
    ms = prepare_multiscale_inputs(
        neck, pad_mask=pad_mask, level_embed=self.level_embed,
        temperature=self.pos_temperature,
        offset=self.pos_offset, masks=masks)
    memory = self.encoder(
        ms.feat_flatten, query_pos=ms.lvl_pos_embed_flatten,
        key_padding_mask=ms.mask_flatten, spatial_shapes=ms.spatial_shapes,
        valid_ratios=ms.valid_ratios)
    enc = O.EncoderState(backbone_feats=tuple(feats), neck_feats=tuple(neck),
                         inputs=ms, memory=memory)
    self.expose('encoded', enc)
    return enc

  def encoder_outputs(self, enc: O.EncoderState) -> O.Proposals:
    """gen_encoder_output_proposals + memory_trans_fc/norm."""
    output_memory, output_proposals = gen_encoder_output_proposals(
        enc.memory, memory_mask=enc.inputs.mask_flatten,
        spatial_shapes=enc.inputs.spatial_shapes)
    props = O.Proposals(
        output_memory=self.memory_trans_norm(
            self.memory_trans_fc(output_memory)),
        output_proposals=output_proposals)
    self.expose('proposals', props)
    return props

  def run_decoder(self, sel: query_selection.QuerySelection,
                  enc: O.EncoderState, *, layout: O.QueryLayout,
                  self_attn_mask=None, semantics=None, invariant=False):
    """The decoder with the head's branches, then the head forward:
    (cls_logits (L, B, Q, K), boxes (L, B, Q, 4), distinct masks)."""
    num_dense = layout.num_dense
    dec = self.decoder(
        sel.query, value=enc.memory, key_padding_mask=enc.inputs.mask_flatten,
        self_attn_mask=self_attn_mask, reference_points=sel.reference_points,
        spatial_shapes=enc.inputs.spatial_shapes,
        valid_ratios=enc.inputs.valid_ratios,
        branches=self.bbox_head.decoder_branches(num_dense=num_dense),
        dis_start=layout.num_dn, num_dis=layout.num_distinct,
        num_dense=num_dense, distinct_mask_semantics=semantics,
        image_normalized_pos=invariant)
    self.expose('decoded', dec)
    cls, box = self.bbox_head(dec.hidden_states, dec.references,
                              num_dense=num_dense)
    return cls, box, dec.head_query_mask

  # ---- pre_decoder -------------------------------------------------------
  def encoder_branches(self, output_memory, output_proposals, *,
                       dense: bool = False):
    """Encoder-level branch outputs: (class logits, coords unact) from
    branch L (distinct) or L + 1 (dense)."""
    i = self.num_decoder_layers + (1 if dense else 0)
    return (self.bbox_head.cls(i, output_memory),
            self.bbox_head.reg(i, output_memory) + output_proposals)

  def select_distinct(self, enc: O.EncoderState, props: O.Proposals, *,
                      valid=None) -> query_selection.QuerySelection:
    """Inference ``pre_decoder``: the encoder heads score every position,
    class-agnostic NMS keeps the first ``num_queries`` survivors
    (zero-padded); content = query_map(memory) at those positions.
    ``valid`` (B, N) bool: positions allowed in (default all, as the
    reference's batched padding)."""
    enc_class, enc_coord_unact = self.encoder_branches(
        props.output_memory, props.output_proposals)
    sel = query_selection.pre_decoder(
        enc_class, enc_coord_unact, enc.memory, query_map=self.query_map,
        num_queries=self.num_queries, iou_threshold=self.nms_iou_threshold,
        pre_topk=self.nms_pre_topk, valid=valid)
    self.expose('selection', sel)
    return sel

  def training_queries(self, enc: O.EncoderState, props: O.Proposals, *,
                       gt_boxes, gt_labels, gt_valid, img_shapes,
                       dn_inject=None, dn_rng=None, valid=None):
    """Training ``pre_decoder``: distinct (NMS) + dense (top-k by score)
    encoder queries, the denoising queries in front, and the full
    self-attention mask [dn (D static slots) | distinct | dense].

    Returns (QuerySelection, DenoisingQueries, QueryLayout)."""
    num_dense = min(self.num_dense_queries, enc.memory.shape[1])
    enc_class, enc_unact = self.encoder_branches(props.output_memory,
                                                 props.output_proposals)
    dense_class, dense_unact = self.encoder_branches(
        props.output_memory, props.output_proposals, dense=True)
    inject = dn_inject or {}
    dn = self.dn_query_generator(
        gt_boxes=gt_boxes, gt_labels=gt_labels, gt_valid=gt_valid,
        img_shapes=img_shapes, num_matching_queries=self.num_queries,
        num_dense_queries=num_dense, rng=dn_rng,
        injected_label_ids=inject.get('label_ids'),
        injected_reference_points=inject.get('reference_points'))
    sel = query_selection.pre_decoder(
        enc_class, enc_unact, enc.memory, query_map=self.query_map,
        num_queries=self.num_queries, iou_threshold=self.nms_iou_threshold,
        pre_topk=self.nms_pre_topk, dense_enc_outputs_class=dense_class,
        dense_enc_outputs_coord_unact=dense_unact,
        dense_topk_ratio=self.dense_topk_ratio,
        dn_label_query=dn.label_query, dn_bbox_query=dn.bbox_query,
        valid=valid)
    self.expose('selection', sel)
    self.expose('denoising', dn)
    layout = O.QueryLayout(num_dn=dn.num_slots,
                           num_distinct=int(self.num_queries),
                           num_dense=num_dense)
    return sel, dn, layout

  # ---- entry points ------------------------------------------------------
  def __call__(self, images: jnp.ndarray, pad_mask: jnp.ndarray, *,
               img_shapes: Optional[jnp.ndarray] = None,
               scale_factors: Optional[jnp.ndarray] = None,
               train: bool = False, gt_boxes=None, gt_labels=None,
               gt_valid=None, dn_inject: Optional[dict] = None,
               dn_rng: Optional[jax.Array] = None,
               semantics: Optional[str] = None,
               padding_invariant: Optional[bool] = None
               ) -> O.DetectorOutputs:
    """Inference (``train=False``) or the training forward.

    Args:
      images: (B, H, W, 3) float32 normalised RGB, NHWC.
      pad_mask: (B, H, W) bool, True = padding.
      img_shapes: (B, 2) real (h, w) of each image on the canvas; scale_factors
        (B, 2) (w, h) of img_shapes over the original image.  Inference:
        given img_shapes, the output has ``detections`` (in original-image
        pixels when scale_factors is given, else in img_shapes pixels).
        Training: img_shapes normalises the ground truth.
      train: training forward (dense + denoising queries).
      gt_boxes (B, G, 4) xyxy pixels, gt_labels (B, G) int, gt_valid (B, G)
        bool: padded ground truth (training).
      dn_inject: optional injected denoising queries (the reference's slot
        layout): {'label_ids' (B, D), 'reference_points' (B, D, 4)};
        otherwise noise is drawn from ``dn_rng``.
      semantics: override the decoder's distinct_mask_semantics ('row0' /
        'kept_set').
      padding_invariant: override; default the ``padding_invariant`` field
        for inference and the reference's batched padding for training.

    Returns:
      ``DetectorOutputs``.  Inference: the distinct block only, and
      ``detections``; training: [dn | distinct | dense] with ``encoder`` and
      ``denoising`` filled.
    """
    invariant = padding_invariant
    if invariant is None:
      invariant = not train and bool(self.padding_invariant)
    enc = self.forward_encoder(images, pad_mask, invariant=invariant)
    props = self.encoder_outputs(enc)
    valid = ~enc.inputs.mask_flatten if invariant else None
    if train:
      out = self._training_forward(
          enc, props, valid=valid, img_shapes=img_shapes, gt_boxes=gt_boxes,
          gt_labels=gt_labels, gt_valid=gt_valid, dn_inject=dn_inject,
          dn_rng=dn_rng, semantics=semantics, invariant=invariant)
    else:
      out = self._inference_forward(
          enc, props, valid=valid, img_shapes=img_shapes,
          scale_factors=scale_factors, semantics=semantics,
          invariant=invariant)
    self.expose('outputs', out)
    return out

  def _inference_forward(self, enc, props, *, valid, img_shapes,
                         scale_factors, semantics, invariant
                         ) -> O.DetectorOutputs:
    """The distinct queries through the decoder; detections when
    ``img_shapes`` is given."""
    sel = self.select_distinct(enc, props, valid=valid)
    layout = O.QueryLayout(num_distinct=int(self.num_queries))
    cls, box, masks = self.run_decoder(sel, enc, layout=layout,
                                       semantics=semantics,
                                       invariant=invariant)
    out = O.DetectorOutputs(cls_logits=cls, boxes=box, distinct_masks=masks,
                            layout=layout, encoder_nms_cut=sel.distinct.cut)
    if img_shapes is not None:  # scale_factors None: no rescale
      out = out.replace(detections=postprocess(
          out, img_shapes=img_shapes, scale_factors=scale_factors,
          max_per_img=self.max_per_img))
    return out

  def _training_forward(self, enc, props, *, valid, img_shapes, gt_boxes,
                        gt_labels, gt_valid, dn_inject, dn_rng, semantics,
                        invariant) -> O.DetectorOutputs:
    """[dn | distinct | dense] queries through the decoder, with the
    encoder predictions and denoising targets the criterion reads."""
    missing = [n for n, x in (('gt_boxes', gt_boxes), ('gt_labels', gt_labels),
                              ('gt_valid', gt_valid),
                              ('img_shapes', img_shapes)) if x is None]
    if missing:
      raise ValueError(f'train=True needs {missing} (padded ground truth '
                       'and the real (h, w) of each image)')
    sel, dn, layout = self.training_queries(
        enc, props, gt_boxes=gt_boxes, gt_labels=gt_labels,
        gt_valid=gt_valid, img_shapes=img_shapes, dn_inject=dn_inject,
        dn_rng=dn_rng, valid=valid)
    cls, box, masks = self.run_decoder(sel, enc, layout=layout,
                                       self_attn_mask=dn.attn_mask,
                                       semantics=semantics,
                                       invariant=invariant)
    return O.DetectorOutputs(cls_logits=cls, boxes=box, distinct_masks=masks,
                             layout=layout, encoder=sel.encoder,
                             denoising=dn.targets,
                             encoder_nms_cut=sel.distinct.cut)


def postprocess(out: O.DetectorOutputs, *, img_shapes, scale_factors,
                max_per_img: int) -> O.Detections:
  """Detections from the last decoder layer (``models/postprocess.py``),
  over the distinct queries of the head's last distinct mask: (B,
  max_per_img) per image.  img_shapes (B, 2) int (h, w); scale_factors
  (B, 2) (w, h) or None."""
  masks = out.distinct_masks
  sl = out.layout.distinct
  return predict_by_feat(
      out.cls_logits[-1][:, sl], out.boxes[-1][:, sl],
      query_mask=masks[-1] if masks.shape[0] else None,
      img_shapes=img_shapes, scale_factors=scale_factors,
      max_per_img=max_per_img)


def build_model(config) -> DDQDETR:
  """The detector for a config (``ddq_jax.config.load_config(...)``)."""
  return DDQDETR.from_config(config)
