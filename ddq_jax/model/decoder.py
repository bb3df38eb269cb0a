"""DDQ-DETR's transformer decoder with per-layer distinct-query selection.

Reference: mmdet 3.3.0 ``layers/transformer/ddq_detr_layers.py``
(``DDQTransformerDecoder``) over ``DeformableDetrTransformerDecoderLayer``
(self-attention = mmcv ``MultiheadAttention`` around ``nn.MultiheadAttention``,
cross-attention = mmcv ``MultiScaleDeformableAttention``, FFN, 3 LayerNorms).

Static shapes: the reference's per-image index lists become one boolean
keep-vector per image.  After every layer but the last, the distinct queries
``[dis_start, dis_start + num_dis)`` are scored by that layer's class branch
(on the layer output before the decoder norm), NMS runs among the current
candidates, and the distinct block of the self-attention mask becomes
"blocked unless row or column is kept".

Row-0 quirk (``distinct_mask_semantics='row0'``, the reference): the head and
the next layer's NMS read row 0 of the inverted mask, i.e. *all* queries if
query 0 was kept, else the kept set.  ``'kept_set'`` reads the kept set.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ddq_jax import backend
from ddq_jax.model import head as head_lib
from ddq_jax.model import initializers as inits
from ddq_jax.model import remat as remat_lib
from ddq_jax.model.deform_attn import DeformableSizes, MultiScaleDeformableAttention
from ddq_jax.model.encoder import FFN
from ddq_jax.model.head import LayerBranches
from ddq_jax.model.layer_norm import LayerNorm
from ddq_jax.ops.attention import attention
from ddq_jax.ops.boxes import cxcywh_to_xyxy, inverse_sigmoid
from ddq_jax.ops.nms import nms_keep

LN_EPS = 1e-5
DECODER_INV_SIGMOID_EPS = 1e-3


def coordinate_to_encoding(coords: jnp.ndarray, *, num_feats: int,
                           temperature: float = 10000.,
                           scale: float = 2 * math.pi) -> jnp.ndarray:
  """mmdet ``coordinate_to_encoding``: (..., 2|4) -> (..., num_feats * 2|4),
  parts ordered (y, x[, w, h]), each interleaving sin/cos."""
  dim_t = jnp.arange(num_feats, dtype=jnp.float32)
  dim_t = temperature ** (2 * (dim_t // 2) / num_feats)

  def enc(c):
    pos = (c * scale)[..., None] / dim_t
    pos = jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], -1)
    return pos.reshape(*pos.shape[:-2], num_feats)

  parts = [enc(coords[..., 1]), enc(coords[..., 0])]
  if coords.shape[-1] == 4:
    parts += [enc(coords[..., 2]), enc(coords[..., 3])]
  elif coords.shape[-1] != 2:
    raise ValueError(f'coordinates must end in 2 or 4, got {coords.shape}')
  return jnp.concatenate(parts, -1)


class _InProj(nn.Module):
  """Packed q/k/v projection with torch's layout (kernel (C, 3C))."""
  embed_dims: int

  @nn.compact
  def __call__(self, q, k, v):
    c = self.embed_dims
    kernel = self.param('kernel', nn.initializers.xavier_uniform(), (c, 3 * c))
    bias = self.param('bias', nn.initializers.zeros, (3 * c,))
    if backend.per_image_attention_projections():
      mm = _per_image_matmul
    else:
      mm = lambda x, w: x @ w  # noqa: E731
    return (mm(q, kernel[:, :c]) + bias[:c], mm(k, kernel[:, c:2 * c]) +
            bias[c:2 * c], mm(v, kernel[:, 2 * c:]) + bias[2 * c:])


def _per_image_matmul(x, kernel):
  """x (B, N, C) @ kernel (C, D) as one matmul per image: the kernel is
  broadcast over the batch, which becomes the dot's batch dimension, so
  the rows of each matmul (and of its gradients) are one image's queries.
  See ``backend.per_image_attention_projections``."""
  kernel = jnp.broadcast_to(kernel, (x.shape[0],) + kernel.shape)
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((0,), (0,))))


class MultiheadAttention(nn.Module):
  """``torch.nn.MultiheadAttention`` (batch_first=True, dropout 0).

  Submodules ``in_proj`` (packed (C, 3C)) and ``out_proj``.
  """
  embed_dims: int
  num_heads: int

  @nn.compact
  def __call__(self, query, key, value, attn_mask=None, segments=()):
    """query (B, Q, C), key/value (B, K, C); attn_mask (B, Q, K) or (Q, K)
    bool, True = blocked (the same for every head); segments: static
    (start, stop) query ranges none of which sees another's keys
    (``ops/attention.py``).  Returns (B, Q, C)."""
    c, nh = self.embed_dims, self.num_heads
    hd = c // nh
    q, k, v = _InProj(c, name='in_proj')(query, key, value)
    b, nq, _ = q.shape
    nk = k.shape[1]
    q = q.reshape(b, nq, nh, hd) * (1.0 / math.sqrt(hd))
    k = k.reshape(b, nk, nh, hd)
    v = v.reshape(b, nk, nh, hd)
    # Blocked entries get finfo.min instead of -inf: a fully blocked row
    # (unused padded slots) stays finite; rows with an open entry are
    # unchanged.
    out = attention(q, k, v, mask=attn_mask,
                    query_block=backend.attention_query_block(nq),
                    segments=segments)
    out = out.reshape(b, nq, c)
    # torch: out_proj bias 0 (MHA._reset_parameters), weight xavier (the
    # detector's pass over the decoder's >1-dim parameters).
    if backend.per_image_attention_projections():
      return _PerImageDense(c, name='out_proj')(out)
    return nn.Dense(c, kernel_init=inits.xavier_uniform,
                    bias_init=inits.zeros, name='out_proj')(out)


class _PerImageDense(nn.Module):
  """``nn.Dense`` (same 'kernel' / 'bias', same values) as one matmul per
  image (``_per_image_matmul``)."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', inits.xavier_uniform,
                        (x.shape[-1], self.features))
    bias = self.param('bias', inits.zeros, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
    return _per_image_matmul(x, kernel) + bias


class SelfAttention(nn.Module):
  """mmcv ``MultiheadAttention`` wrapper: pos added to q and k, residual."""
  embed_dims: int
  num_heads: int

  @nn.compact
  def __call__(self, query, *, query_pos=None, attn_mask=None, segments=()):
    qk = query if query_pos is None else query + query_pos
    out = MultiheadAttention(self.embed_dims, self.num_heads, name='attn')(
        qk, qk, query, attn_mask, segments)
    return query + out


class DecoderLayer(DeformableSizes, kw_only=True):
  """``DeformableDetrTransformerDecoderLayer``: self-attn, norm, deformable
  cross-attn, norm, FFN, norm.  ``spatial_shapes`` is a (static) attribute,
  so every call argument is an array and the layer can be rematerialised.
  ``self_attn_segments``: static query ranges that never see each other
  (the self-attention computes each alone)."""
  ffn_dims: int
  spatial_shapes: Sequence[Sequence[int]] = ()
  self_attn_segments: Sequence[tuple[int, int]] = ()

  @nn.compact
  def __call__(self, query, query_pos, value, key_padding_mask,
               self_attn_mask, reference_points):
    """query, query_pos (B, Q, C); value (B, N, C); key_padding_mask (B, N)
    or None; self_attn_mask (B, Q, Q) True = blocked; reference_points
    (B, Q, L, 4) -> (B, Q, C)."""
    c = self.embed_dims
    spatial_shapes = self.spatial_shapes
    query = SelfAttention(c, self.num_heads, name='self_attn')(
        query, query_pos=query_pos, attn_mask=self_attn_mask,
        segments=self.self_attn_segments)
    query = LayerNorm(epsilon=LN_EPS, name='norms_0')(query)
    query = MultiScaleDeformableAttention(
        **self.deformable_sizes(), name='cross_attn')(
            query, value=value, reference_points=reference_points,
            spatial_shapes=spatial_shapes, key_padding_mask=key_padding_mask,
            query_pos=query_pos)
    query = LayerNorm(epsilon=LN_EPS, name='norms_1')(query)
    query = FFN(embed_dims=c, feedforward_channels=self.ffn_dims,
                name='ffn')(query)
    return LayerNorm(epsilon=LN_EPS, name='norms_2')(query)


class MLP(nn.Module):
  """mmdet ``MLP``: Linear layers named layers_{i}, ReLU between.  Init as
  part of the decoder: weights xavier_uniform, biases torch's default."""
  hidden_dims: int
  output_dims: int
  num_layers: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.output_dims if last else self.hidden_dims,
                   kernel_init=inits.xavier_uniform,
                   bias_init=inits.torch_linear_bias(x.shape[-1]),
                   name=f'layers_{i}')(x)
      if not last:
        x = jax.nn.relu(x)
    return x


def distinct_block_mask(keep: jnp.ndarray) -> jnp.ndarray:
  """(B, N) keep -> (B, N, N) blocked mask: open where row or column kept."""
  return ~(keep[:, :, None] | keep[:, None, :])


def row0_of_inverted(keep: jnp.ndarray) -> jnp.ndarray:
  """Row 0 of ``~distinct_block_mask(keep)``: all True if query 0 is kept,
  else ``keep``.  (B, N) -> (B, N)."""
  return keep | keep[:, :1]


@flax.struct.dataclass
class DecoderOutputs:
  """What the decoder gives the head and the caller.

  Attributes:
    hidden_states: (L, B, Q, C) every layer's output after the decoder norm.
    references: (L + 1, B, Q, 4) sigmoid cxcywh, the initial one first
      (later ones carry the gradient of that layer's refinement).
    distinct_keep: (L - 1, B, num_dis) bool, the NMS keep set per layer.
    head_query_mask: (L - 1, B, num_dis) bool, what the head reads (row 0
      of the inverted mask, or the kept set).
    self_attn_mask: (B, Q, Q) the self-attention mask after the last
      selection.
  """
  hidden_states: jnp.ndarray
  references: jnp.ndarray
  distinct_keep: jnp.ndarray
  head_query_mask: jnp.ndarray
  self_attn_mask: jnp.ndarray


def _checked_semantics(semantics: str) -> str:
  if semantics not in ('row0', 'kept_set'):
    raise ValueError('distinct_mask_semantics must be "row0" or '
                     f'"kept_set", got {semantics!r}')
  return semantics


def _per_image_mask(self_attn_mask, b: int, q: int) -> jnp.ndarray:
  """A (Q, Q) mask, or None (all open), as (B, Q, Q)."""
  if self_attn_mask is None:
    return jnp.zeros((b, q, q), bool)
  if self_attn_mask.ndim == 2:
    return jnp.broadcast_to(self_attn_mask, (b, q, q))
  return self_attn_mask


def _select_distinct(br, query, reference_points, self_attn_mask, candidates,
                     *, start: int, stop: int, iou_threshold: float,
                     semantics: str):
  """Scores + NMS of the distinct queries [start, stop) after a layer (its
  branches ``br``) -> the new (mask, candidates, keep, head_mask)."""
  s, e = start, stop
  scores = jnp.max(jax.nn.sigmoid(head_lib.dense(br.cls, query[:, s:e])), -1)
  boxes = cxcywh_to_xyxy(reference_points[:, s:e])
  keep = nms_keep(jax.lax.stop_gradient(boxes),
                  jax.lax.stop_gradient(scores), valid=candidates,
                  iou_threshold=iou_threshold)
  self_attn_mask = jax.lax.dynamic_update_slice(
      self_attn_mask, distinct_block_mask(keep), (0, s, s))
  head_mask = row0_of_inverted(keep) if semantics == 'row0' else keep
  return self_attn_mask, head_mask, keep, head_mask


def _skip_selection(br, query, reference_points, self_attn_mask, candidates):
  """The last layer selects nothing."""
  del br, query, reference_points
  return self_attn_mask, candidates, candidates, candidates


def _layer_step(carry, xs, *, layer, ref_point_head, value,
                key_padding_mask, vr4, num_dense: int, num_layers: int,
                select, image_normalized_pos: bool):
  """Layer l (``xs``: its index, parameters and head branches): its output
  (before the norm), the refined references, and the selection state for
  layer l + 1.  ``carry``: (query, reference_points, self_attn_mask,
  candidates)."""
  query, reference_points, self_attn_mask, candidates = carry
  l, p, br = xs
  c = query.shape[-1]
  ref_input = reference_points[:, :, None] * vr4[:, None]
  query_pos = ref_point_head(coordinate_to_encoding(
      reference_points if image_normalized_pos else ref_input[:, :, 0],
      num_feats=c // 2))
  query = layer.apply({'params': p}, query, query_pos, value,
                      key_padding_mask, self_attn_mask, ref_input)
  if num_dense:
    tmp = jnp.concatenate(
        [head_lib.reg_mlp(br.reg, query[:, :-num_dense]),
         head_lib.reg_mlp(br.aux_reg, query[:, -num_dense:])], 1)
  else:
    tmp = head_lib.reg_mlp(br.reg, query)
  new_refs = jax.nn.sigmoid(tmp + inverse_sigmoid(
      reference_points, eps=DECODER_INV_SIGMOID_EPS))
  reference_points = jax.lax.stop_gradient(new_refs)
  self_attn_mask, candidates, keep, head_mask = jax.lax.cond(
      l < num_layers - 1, select, _skip_selection, br, query,
      reference_points, self_attn_mask, candidates)
  return ((query, reference_points, self_attn_mask, candidates),
          (query, new_refs, keep, head_mask))


def _scan_layers(body, carry, xs, *, remat: str, scan: bool):
  """``lax.scan`` of the layer step ``body`` over the stacked ``xs``
  (unrolled unless ``scan``); ``remat`` != 'none': the whole step (with
  the head's branches and the selection) is rematerialised, so a layer
  keeps only its carry for the backward pass, and the selection (no
  gradient) is not recomputed there."""
  if remat != 'none':
    body = jax.checkpoint(body, policy=remat_lib.checkpoint_policy(remat),
                          prevent_cse=False)
  # The carry takes the dtypes a layer returns (e.g. float32 after
  # bfloat16 inputs), as the carry of every later layer.
  out_carry, _ = jax.eval_shape(body, carry,
                                jax.tree.map(lambda x: x[0], xs))
  carry = jax.tree.map(lambda x, o: x.astype(o.dtype), carry, out_carry)
  return jax.lax.scan(body, carry, xs, unroll=1 if scan else True)


class DDQDecoder(DeformableSizes, kw_only=True):
  """``DDQTransformerDecoder`` (return_intermediate=True): one ``lax.scan``
  of the layer step over the stacked ``layers`` parameters and the head's
  branches of the decoder layers.

  Parameters: ``layers/...`` (every leaf with a leading axis of
  ``num_layers``: torch's ``decoder.layers.{l}`` is entry l),
  ``ref_point_head/layers_{0,1}`` and ``norm``.  The head's branches are
  passed in (``head.LayerBranches``) so that they stay owned by the head
  (``bbox_head``) in the params tree.
  """
  num_layers: int = 6
  ffn_dims: int = 2048
  iou_threshold: float = 0.8
  distinct_mask_semantics: str = 'row0'
  # 'none' | 'minimal' | 'full' per decoder layer (ddq_jax/model/remat.py).
  remat: str = 'none'
  # A scan loop (the layer step compiled once); False unrolls the same scan.
  scan: bool = True

  @classmethod
  def from_config(cls, config, **kwargs) -> 'DDQDecoder':
    kw = dict(**cls.sizes_from_config(config),
              num_layers=config.num_decoder_layers, ffn_dims=config.ffn_dims,
              iou_threshold=config.nms_iou_threshold,
              distinct_mask_semantics=config.distinct_mask_semantics,
              remat=remat_lib.remat_name(config, 'decoder'),
              scan=remat_lib.scan_layers(config))
    kw.update(kwargs)
    return cls(**kw)

  @nn.compact
  def __call__(self, query: jnp.ndarray, *, value: jnp.ndarray,
               key_padding_mask: Optional[jnp.ndarray],
               self_attn_mask: Optional[jnp.ndarray],
               reference_points: jnp.ndarray,
               spatial_shapes: Sequence[Sequence[int]],
               valid_ratios: jnp.ndarray, branches: LayerBranches,
               dis_start: int = 0, num_dis: Optional[int] = None,
               num_dense: int = 0,
               distinct_mask_semantics: Optional[str] = None,
               image_normalized_pos: bool = False) -> DecoderOutputs:
    """Runs all decoder layers.

    Args:
      query: (B, Q, C) initial content queries, Q = [dn | distinct | dense].
      value: (B, N, C) encoder memory; key_padding_mask (B, N) True = pad.
      self_attn_mask: (Q, Q) or (B, Q, Q) bool, True = blocked; None = open.
      reference_points: (B, Q, 4) sigmoid cxcywh.
      spatial_shapes: static ((h, w), ...); valid_ratios (B, levels, 2).
      branches: the head's cls / reg (and, with dense queries, aux reg)
        branches of the decoder layers, stacked (``DDQHead.decoder_branches``).
      dis_start, num_dis: static slice of the distinct queries
        (default 0, Q - num_dense).
      num_dense: static number of dense queries at the end (training);
        they and the other queries never see each other (the mask's blocks
        between them are taken as blocked and not read).
      distinct_mask_semantics: overrides the attribute ('row0'/'kept_set').
      image_normalized_pos: the query positional encoding reads the
        reference points themselves (what an unpadded image gives: valid
        ratios 1) instead of the canvas-scaled ones (the reference's
        batched padding): padding-invariant mode.

    Returns:
      ``DecoderOutputs``.
    """
    semantics = _checked_semantics(distinct_mask_semantics or
                                   self.distinct_mask_semantics)
    b, q, c = query.shape
    if num_dis is None:
      num_dis = q - dis_start - num_dense
    self_attn_mask = _per_image_mask(self_attn_mask, b, q)
    s, e = dis_start, dis_start + num_dis
    # Candidates of the next NMS: row 0 of the inverted distinct block.
    candidates = ~self_attn_mask[:, s, s:e]

    vr4 = jnp.concatenate([valid_ratios, valid_ratios], -1)  # (B, L, 4)
    shapes = tuple((int(hh), int(ww)) for hh, ww in spatial_shapes)
    n_layers = self.num_layers
    # The dense queries and the rest never see each other (the reference's
    # dense extension of the dn mask): the self-attention computes the two
    # apart, and the mask's blocks between them are not read.
    segments = ((0, q - num_dense), (q - num_dense, q)) if num_dense else ()
    layer = DecoderLayer(**self.deformable_sizes(), ffn_dims=self.ffn_dims,
                         spatial_shapes=shapes, self_attn_segments=segments)
    ref_point_head = MLP(c, c, 2)
    ref_input = jnp.zeros((b, q, len(shapes), 4), reference_points.dtype)
    layer_params = remat_lib.stacked_params(
        self, 'layers', layer, n_layers, query, query, value,
        key_padding_mask, self_attn_mask, ref_input)
    head_params = remat_lib.module_params(
        self, 'ref_point_head', ref_point_head,
        jnp.zeros((b, q, 2 * c), query.dtype))
    norm = LayerNorm(epsilon=LN_EPS, name='norm')
    if remat_lib.num_stacked(branches.cls) != n_layers:
      raise ValueError(f'{n_layers} decoder layers but '
                       f'{remat_lib.num_stacked(branches.cls)} head branches')

    select = functools.partial(_select_distinct, start=s, stop=e,
                               iou_threshold=self.iou_threshold,
                               semantics=semantics)
    body = functools.partial(
        _layer_step, layer=layer,
        ref_point_head=lambda x: ref_point_head.apply(
            {'params': head_params}, x),
        value=value, key_padding_mask=key_padding_mask, vr4=vr4,
        num_dense=num_dense, num_layers=n_layers, select=select,
        image_normalized_pos=image_normalized_pos)
    carry, (outs, new_refs, keeps, head_masks) = _scan_layers(
        body, (query, reference_points, self_attn_mask, candidates),
        (jnp.arange(n_layers), layer_params, branches), remat=self.remat,
        scan=self.scan)
    return DecoderOutputs(
        hidden_states=norm(outs),
        references=jnp.concatenate([reference_points[None], new_refs], 0),
        distinct_keep=keeps[:-1], head_query_mask=head_masks[:-1],
        self_attn_mask=carry[2])
