"""Contrastive denoising (CDN) queries, as mmdet's ``CdnQueryGenerator``
(models/layers/transformer/dino_layers.py, dynamic groups), static shapes.

Ground truth comes padded: ``gt_boxes`` (B, G, 4) **xyxy pixels** in each
image's ``img_shape`` space (as the reference's ``gt_instances.bboxes``),
``img_shapes`` (B, 2) real (h, w), ``gt_labels`` (B, G), ``gt_valid`` (B, G)
(the t-th target of an image is its t-th valid slot).

Slot layout (the reference's, a prefix of D static slots): with M the
batch's largest gt count and ``g = max(num_dn_queries // M, 1)`` groups
(both computed in-graph), slot ``s < 2 g M`` is in group ``s // 2M``;
``r = s % 2M``: positive for target ``r`` if ``r < M``, negative for target
``r - M`` otherwise.  Slots whose target index >= the image's gt count hold a
zero content query and a zero (-> 0.5) box, and take part in attention as
in the reference.  Slots ``s >= 2 g M`` are unused: blocked for every other
query (and they see only themselves, so no softmax row is empty).
D = 2 * max(num_dn_queries, G) covers every case (2 g M <= 2 num_dn_queries
when M <= num_dn_queries, else g = 1 and 2 g M = 2 M <= 2 G).

Query order in the decoder: [dn (D) | distinct (num_queries) | dense], the
dense block (training, DDQ) attends only to itself and is seen by no one.
"""
from __future__ import annotations

from typing import Optional

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax.model import initializers as inits
from ddq_jax.model.outputs import DenoisingTargets
from ddq_jax.ops import boxes as box_ops
from ddq_jax.ops.indexing import div_nonneg, rem_nonneg
from ddq_jax.ops.indexing import take_along_axis_in_range


def num_dn_slots(*, num_dn_queries: int, max_gt: int) -> int:
  """Static slot count D = 2 * max(num_dn_queries, max_gt)."""
  return 2 * max(int(num_dn_queries), int(max_gt))


def dn_layout(gt_valid: jnp.ndarray, *, num_dn_queries: int,
              num_slots: int) -> dict:
  """In-graph group count and per-slot layout.

  Args:
    gt_valid: (B, G) bool.
    num_dn_queries: the config's ``num_dn_queries``.
    num_slots: static D.
  Returns dict:
    max_num_target () int32 (M), num_groups () int32,
    num_denoising_queries () int32 (2 g M, the reference's count),
    slot_in_range (D,) bool (s < 2 g M), slot_group (D,) int32 (-1 unused),
    slot_positive (D,) bool (first half of its group),
    slot_target (D,) int32 (target rank t), slot_has_gt (B, D) bool
    (in range and t < the image's gt count), slot_gt_index (B, D) int32
    (column of the t-th valid gt; 0 where no gt), positive (B, D) bool
    (slot_has_gt & slot_positive).
  """
  b, g_slots = gt_valid.shape
  n = jnp.sum(gt_valid, axis=-1).astype(jnp.int32)            # (B,)
  m = jnp.max(n) if b else jnp.int32(0)
  m1 = jnp.maximum(m, 1)
  groups = jnp.where(m == 0, 1, jnp.maximum(div_nonneg(
      jnp.int32(num_dn_queries), m1), 1)).astype(jnp.int32)
  used = (2 * groups * m).astype(jnp.int32)
  s = jnp.arange(num_slots, dtype=jnp.int32)
  in_range = s < used
  r = rem_nonneg(s, 2 * m1)
  positive_slot = r < m1
  t = jnp.where(positive_slot, r, r - m1)
  group = jnp.where(in_range, div_nonneg(s, 2 * m1), -1)
  has_gt = in_range[None, :] & (t[None, :] < n[:, None])
  order = jnp.argsort(~gt_valid, axis=-1, stable=True).astype(jnp.int32)
  col = take_along_axis_in_range(
      order, jnp.broadcast_to(jnp.minimum(t, max(g_slots - 1, 0)),
                              (b, num_slots)), axis=-1) if g_slots else \
      jnp.zeros((b, num_slots), jnp.int32)
  col = jnp.where(has_gt, col, 0)
  return dict(max_num_target=m.astype(jnp.int32), num_groups=groups,
              num_denoising_queries=used, slot_in_range=in_range,
              slot_group=group.astype(jnp.int32), slot_positive=positive_slot,
              slot_target=t, slot_has_gt=has_gt, slot_gt_index=col,
              positive=has_gt & positive_slot[None, :])


def build_self_attn_mask(slot_group: jnp.ndarray, *, num_matching: int,
                         num_dense: int = 0) -> jnp.ndarray:
  """The decoder's self-attention mask, True = blocked.

  Args:
    slot_group: (D,) int32 denoising group of each slot, -1 = unused.
    num_matching: static number of distinct (matching) queries.
    num_dense: static number of dense queries (0 in eval).
  Returns:
    (Q, Q) bool, Q = D + num_matching + num_dense, equal to the reference's
    ``generate_dn_mask`` + DDQ's dense extension on the used slots.
  """
  d = slot_group.shape[0]
  q_main = d + num_matching
  q = q_main + num_dense
  used = slot_group >= 0
  eye = jnp.eye(d, dtype=bool)
  # dn rows x dn cols: open within the same group; unused slots see only
  # themselves and are seen by no one else.
  dn_dn = ~((slot_group[:, None] == slot_group[None, :])
            & used[:, None] & used[None, :]) & ~eye
  dn_match = jnp.broadcast_to(~used[:, None], (d, num_matching))
  match_dn = jnp.ones((num_matching, d), bool)
  match_match = jnp.zeros((num_matching, num_matching), bool)
  main = jnp.concatenate([
      jnp.concatenate([dn_dn, dn_match], axis=1),
      jnp.concatenate([match_dn, match_match], axis=1)], axis=0)
  if num_dense == 0:
    return main
  mask = jnp.ones((q, q), bool)
  mask = mask.at[:q_main, :q_main].set(main)
  mask = mask.at[q_main:, q_main:].set(False)
  return mask


def _unit_uniform(bits: jnp.ndarray) -> jnp.ndarray:
  """uint32 random bits -> float32 uniform in [0, 1) (23 mantissa bits, as
  ``jax.random.uniform``)."""
  one = jax.lax.bitcast_convert_type(
      (bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32)
  return one - 1.0


def noisy_dn_targets(key: jax.Array, *, gt_boxes: jnp.ndarray,
                     gt_labels: jnp.ndarray, img_shapes: jnp.ndarray,
                     layout: dict, num_classes: int,
                     label_noise_scale: float, box_noise_scale: float):
  """Random noisy labels and boxes (the reference's formulas), per slot.

  Returns labels (B, D) int32 (-1 where the slot has no gt), bbox_query
  (B, D, 4) inverse-sigmoid (eps 1e-3) normalised cxcywh (0 where no gt).
  """
  has_gt, col = layout['slot_has_gt'], layout['slot_gt_index']
  b, d = has_gt.shape
  # One draw of random bits for all the noise (each threefry draw is a loop
  # of its own in the compiled step): per slot, bits 0: label-noise uniform,
  # 1: the random class, 2-5: corner signs, 6-9: corner magnitudes.
  bits = jax.random.bits(key, (b, d, 10), jnp.uint32)
  labels = take_along_axis_in_range(gt_labels.astype(jnp.int32), col, axis=1)
  # label noise: positions with p < scale / 2 get a random class
  p = _unit_uniform(bits[..., 0])
  new_labels = rem_nonneg(bits[..., 1], num_classes).astype(jnp.int32)
  labels = jnp.where(p < label_noise_scale * 0.5, new_labels, labels)
  labels = jnp.where(has_gt, labels, -1)
  # box noise on normalised xyxy corners
  factor = box_ops.image_size_factor(img_shapes)[:, None, :]   # (B, 1, 4)
  boxes = take_along_axis_in_range(gt_boxes.astype(jnp.float32),
                              col[..., None], axis=1) / factor  # (B, D, 4)
  sign = (bits[..., 2:6] & jnp.uint32(1)).astype(jnp.float32) * 2.0 - 1.0
  part = _unit_uniform(bits[..., 6:10])
  negative = ~layout['slot_positive']
  part = part + negative[None, :, None].astype(jnp.float32)
  part = part * sign
  wh = box_ops.xyxy_to_cxcywh(boxes)[..., 2:]
  whwh = jnp.concatenate([wh, wh], axis=-1)
  noisy = boxes + part * whwh * box_noise_scale / 2
  noisy = jnp.clip(noisy, 0.0, 1.0)
  bbox_query = box_ops.inverse_sigmoid(box_ops.xyxy_to_cxcywh(noisy),
                                       eps=1e-3)
  bbox_query = jnp.where(has_gt[..., None], bbox_query, 0.0)
  return labels, bbox_query


@struct.dataclass
class DenoisingQueries:
  """``CdnQueryGenerator``'s result.

  label_query (B, D, C) and bbox_query (B, D, 4) inverse-sigmoid: the
  denoising queries; attn_mask (Q, Q) bool, True = blocked, Q = D +
  num_matching + num_dense: the decoder's self-attention mask; labels
  (B, D) the noisy class ids used (-1 = zero content query); layout: the
  slot layout (``dn_layout``'s dict); num_slots: the static D.
  """
  label_query: jax.Array
  bbox_query: jax.Array
  attn_mask: jax.Array
  labels: jax.Array
  layout: dict
  num_slots: int = struct.field(pytree_node=False, default=0)

  @property
  def targets(self) -> DenoisingTargets:
    """What the denoising loss reads of the layout."""
    return DenoisingTargets.from_layout(self.layout)


class CdnQueryGenerator(nn.Module):
  """Static-shape ``CdnQueryGenerator`` (dynamic dn groups).

  Param: ``label_embedding/embedding`` (num_classes, embed_dims), from the
  torch ``dn_query_generator.label_embedding.weight``.
  """
  num_classes: int
  embed_dims: int
  num_dn_queries: int = 100
  label_noise_scale: float = 0.5
  box_noise_scale: float = 1.0

  def setup(self):
    # torch nn.Embedding default init: N(0, 1).
    self.label_embedding = nn.Embed(self.num_classes, self.embed_dims,
                                    embedding_init=inits.normal_std1,
                                    name='label_embedding')

  def embed_labels(self, labels: jnp.ndarray) -> jnp.ndarray:
    """(B, D) ids, -1 = zero vector -> (B, D, C)."""
    emb = self.label_embedding(jnp.maximum(labels, 0))
    return jnp.where((labels >= 0)[..., None], emb, 0.0).astype(emb.dtype)

  def __call__(self, *, gt_boxes: jnp.ndarray, gt_labels: jnp.ndarray,
               gt_valid: jnp.ndarray, img_shapes: jnp.ndarray,
               num_matching_queries: int, num_dense_queries: int = 0,
               rng: Optional[jax.Array] = None,
               injected_label_ids: Optional[jnp.ndarray] = None,
               injected_reference_points: Optional[jnp.ndarray] = None
               ) -> DenoisingQueries:
    """Denoising queries, the decoder's self-attention mask, the layout.

    Args:
      gt_boxes: (B, G, 4) xyxy pixels of ``img_shapes``.
      gt_labels: (B, G) int; gt_valid: (B, G) bool; img_shapes: (B, 2) (h, w).
      num_matching_queries, num_dense_queries: static sizes for the mask.
      rng: PRNG key for the noise (uses ``self.make_rng('dn')`` if None and
        nothing is injected).
      injected_label_ids: optional (B, Di) noisy class ids in the slot
        layout, -1 = zero content query (Di <= D; the rest padded with -1).
      injected_reference_points: optional (B, Di, 4) sigmoid-space noisy
        cxcywh boxes (-> inverse_sigmoid eps 1e-3); slots beyond Di get 0.
    Returns:
      ``DenoisingQueries``.
    """
    b, g = gt_valid.shape
    d = num_dn_slots(num_dn_queries=self.num_dn_queries, max_gt=g)
    layout = dn_layout(jnp.asarray(gt_valid, bool),
                       num_dn_queries=self.num_dn_queries, num_slots=d)
    if injected_label_ids is not None:
      di = injected_label_ids.shape[1]
      assert di <= d, (di, d)
      labels = jnp.full((b, d), -1, jnp.int32).at[:, :di].set(
          injected_label_ids.astype(jnp.int32))
      pts = injected_reference_points.astype(jnp.float32)
      bbox_query = jnp.zeros((b, d, 4), jnp.float32).at[:, :di].set(
          box_ops.inverse_sigmoid(pts, eps=1e-3))
    else:
      key = rng if rng is not None else self.make_rng('dn')
      labels, bbox_query = noisy_dn_targets(
          key, gt_boxes=jnp.asarray(gt_boxes), gt_labels=jnp.asarray(gt_labels),
          img_shapes=jnp.asarray(img_shapes), layout=layout,
          num_classes=self.num_classes,
          label_noise_scale=self.label_noise_scale,
          box_noise_scale=self.box_noise_scale)
    label_query = self.embed_labels(labels)
    attn_mask = build_self_attn_mask(layout['slot_group'],
                                     num_matching=num_matching_queries,
                                     num_dense=num_dense_queries)
    return DenoisingQueries(label_query=label_query, bbox_query=bbox_query,
                            attn_mask=attn_mask, labels=labels, layout=layout,
                            num_slots=d)
