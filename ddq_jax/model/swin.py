"""Swin Transformer backbone: mmdet 3.3.0 ``backbones/swin.py``.

The reference as DDQ-DETR's Swin-L setting uses it (patch size 4, strides
(4, 2, 2, 2), LayerNorm eps 1e-5, exact-erf GELU, no absolute position
embedding), with mmcv's FFN / DropPath semantics.  NHWC in, a list of NHWC
maps out (one per ``out_indices``, after that stage's ``norm{i}``).

Module tree (the torch names under the naming rule, but for the block
pairs, stored stacked):

    patch_embed/{projection, norm}
    stages_{i}/pairs/{regular, shifted}/{norm1, attn/w_msa/{qkv, proj,
        relative_position_bias_table}, norm2, ffn/{layers_0_0, layers_1}}
                          (every leaf with a leading axis of depth // 2:
                           entry k is torch's blocks.{2k} / blocks.{2k+1})
    stages_{i}/blocks_{depth-1}/...              (an odd last block)
    stages_{i}/downsample/{norm, reduction}      (i < num_stages - 1)
    norm{i}                                      (i in out_indices)

The per-block torch names live at the conversion boundary
(io/conversion/mapping.py ``STACKED``: conversion stacks, export unstacks,
and weights written per block load, stacked once when read).

What the reference does and this reproduces:
  * PatchEmbed pads the image bottom/right with zeros to a multiple of the
    patch size (AdaptivePadding 'corner'), conv k=s=4, then LayerNorm.
  * Each block pads its (normed) map bottom/right with zeros to whole
    windows; the padded tokens take part in the attention as keys (no mask
    hides them), and are cropped afterwards.
  * Odd blocks shift by window // 2 (cyclic roll) with the -100 attention
    mask of the shifted regions, computed on the padded map.
  * PatchMerging pads to even sizes, gathers 2x2 neighbours in nn.Unfold's
    channel order (c * 4 + kh * 2 + kw), LayerNorm(4C), Linear(4C, 2C)
    without bias.
  * Stochastic depth: rate ``linspace(0, drop_path_rate, sum(depths))`` per
    block, once on the attention branch and once on the FFN branch, per
    sample, ``x / keep * floor(keep + U)``.  Dropout and drop-path are active
    only in training: when the module is applied with a ``'dropout'`` rng
    (Flax's convention); without one (evaluation, ``init``) they are off.
  * Frozen stages (``frozen_stages`` = k >= 0): patch_embed, stages 0..k-1
    and their output norms get no gradient (stop_gradient) and run in eval
    mode (no drop-path), as ``_freeze_stages`` sets ``requires_grad=False``
    and ``.eval()``.  ``from_config`` reads k from the frozen parameters of
    ``model/param_groups.py``, the list the optimiser reads.

Padding invariance (``extents`` given, inference): each image's map at
stage i is its top-left ceil((h, w) / (4 * 2**i)) block, and everything
that depends on the map's size (the zero padding of PatchEmbed, of every
block's windows and of PatchMerging, the shifted blocks' roll and their
-100 regions) follows each image's own size, as the reference computes it
for the image alone (swin_attention.py, docs/PADDING.md).

Memory and compile time (no change to the numbers): ``train.remat.backbone``
re-materialises each trainable block pair; each stage's (regular, shifted)
block pairs (``SwinBlockPair``) run as one ``lax.scan`` over their stacked
parameters, a loop with ``train.scan_layers`` (stage 3 of Swin-L: 9 pairs
traced once), else the same scan unrolled.  The window attention is in
swin_attention.py, the window geometry in swin_windows.py.

Init (``init_cfg=None``): Linear weights truncated normal std 0.02 and
biases 0, LayerNorm 1 / 0, the relative position bias tables zeros (the
reference never re-initialises them: its ``init_weights`` does not recurse),
the patch-embedding conv torch's default.  A real run loads the ImageNet
weights over this (``train.init_from``, ``ddq_jax/io/conversion/swin.py``).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.model import param_groups
from ddq_jax.model import remat as remat_lib
from ddq_jax.model.drop_path import drop_path, drop_path_rates
from ddq_jax.model.layer_norm import LayerNorm
from ddq_jax.model.extents import extent_at_stride, extent_valid, zero_outside
from ddq_jax.model.swin_attention import dense, DROP_RNG, ShiftWindowMSA, WindowAttentionOptions
from ddq_jax.model.swin_windows import pad_bottom_right, unfold_2x2

LN_EPS = 1e-5  # mmcv build_norm_layer(dict(type='LN')): torch's default

# torch Conv2d default: kaiming_uniform(a=sqrt(5)) -> U(+-1/sqrt(fan_in)).
_torch_conv_kernel = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in',
                                                      'uniform')


def _torch_conv_bias(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _layer_norm(name: str) -> LayerNorm:
  return LayerNorm(epsilon=LN_EPS, fast_variance=False, name=name)


# ---------------------------------------------------------------- pure parts
def swin_out_channels(*, embed_dims: int, out_indices: Sequence[int]
                      ) -> tuple[int, ...]:
  """Channels of the backbone's outputs (the neck's ``in_channels``)."""
  return tuple(int(embed_dims * 2**i) for i in out_indices)


# ------------------------------------------------------------------ modules
class _SwinBlockOptions(WindowAttentionOptions, kw_only=True):
  """The attributes a Swin stage hands on to each of its blocks."""
  feedforward_channels: int
  drop_rate: float = 0.0

  def swin_block_options(self) -> dict:
    """These attributes as keyword arguments."""
    return dict(self.window_attention_options(),
                feedforward_channels=self.feedforward_channels,
                drop_rate=self.drop_rate)


class SwinFFN(nn.Module):
  """mmcv FFN(num_fcs=2, GELU, add_identity) with DropPath on the branch."""
  embed_dims: int
  feedforward_channels: int
  ffn_drop: float = 0.0
  drop_path_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, identity, drop_path_rate=None):
    drop = lambda y: nn.Dropout(self.ffn_drop, deterministic=self.deterministic,
                                rng_collection=DROP_RNG)(y)
    out = dense(self.feedforward_channels, 'layers_0_0')(x)
    out = drop(jax.nn.gelu(out, approximate=False))
    out = drop(dense(self.embed_dims, 'layers_1')(out))
    rng = None if self.deterministic else self.make_rng(DROP_RNG)
    rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
    return identity + drop_path(out, rate=rate, rng=rng)


class SwinBlock(_SwinBlockOptions, kw_only=True):
  """norm1 -> (S)W-MSA -> + x -> norm2 -> FFN -> + x, on (B, H, W, C)."""
  shift: bool = False
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x, drop_path_rate=None, extent=None):
    """x (B, H, W, C) -> (B, H, W, C); ``drop_path_rate`` (traced scalar)
    overrides the attribute (a scanned block's rate); ``extent`` (B, 2)
    int: each image's (h, w) on this map (padding-invariant mode)."""
    identity = x
    x = _layer_norm('norm1')(x)
    x = ShiftWindowMSA(
        **self.window_attention_options(),
        shift_size=self.window_size // 2 if self.shift else 0,
        proj_drop_rate=self.drop_rate, drop_path_rate=self.drop_path_rate,
        name='attn')(x, drop_path_rate, extent)
    x = x + identity
    return SwinFFN(
        embed_dims=self.embed_dims,
        feedforward_channels=self.feedforward_channels,
        ffn_drop=self.drop_rate, drop_path_rate=self.drop_path_rate,
        deterministic=self.deterministic, name='ffn')(_layer_norm('norm2')(x),
                                                      x, drop_path_rate)


class SwinBlockPair(_SwinBlockOptions, kw_only=True):
  """A regular block then a shifted one (a stage's blocks 2k and 2k + 1),
  their drop-path rates traced: the unit a stage stores stacked and scans
  (``stages_{i}/pairs/{regular, shifted}``, entry k of the leading axis
  being torch's ``blocks.{2k}`` and ``blocks.{2k+1}``)."""

  @nn.compact
  def __call__(self, x, extent, rates):
    """x (B, H, W, C), extent (B, 2) int or None (``SwinBlock``), rates
    (2,) float32 -> (B, H, W, C)."""
    opts = self.swin_block_options()
    x = SwinBlock(**opts, shift=False, name='regular')(x, rates[0], extent)
    return SwinBlock(**opts, shift=True, name='shifted')(x, rates[1], extent)


class PatchMerging(nn.Module):
  """2x2 unfold (padding to even sizes) -> LayerNorm(4C) -> Linear(2C)."""
  out_channels: int
  patch_norm: bool = True

  @nn.compact
  def __call__(self, x, extent=None):
    """x (B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), out_channels);
    ``extent`` (B, 2) int: zeros outside each image's (h, w) first, as the
    reference pads an image's own map."""
    if extent is not None:
      x = zero_outside(x, extent_valid(extent, stride=1, shape=x.shape[1:3]))
    x = unfold_2x2(pad_bottom_right(x, 2))
    if self.patch_norm:
      x = _layer_norm('norm')(x)
    return dense(self.out_channels, 'reduction', use_bias=False)(x)


class PatchEmbed(nn.Module):
  """Zero pad to the patch size -> conv k=s=patch -> LayerNorm."""
  embed_dims: int
  patch_size: int = 4
  patch_norm: bool = True

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    fan_in = p * p * x.shape[-1]
    x = pad_bottom_right(x, p)
    x = nn.Conv(self.embed_dims, (p, p), strides=(p, p), padding='VALID',
                kernel_init=_torch_conv_kernel,
                bias_init=_torch_conv_bias(fan_in), name='projection')(x)
    if self.patch_norm:
      x = _layer_norm('norm')(x)
    return x


class SwinStage(_SwinBlockOptions, kw_only=True):
  """SwinBlockSequence: ``depth`` blocks (odd ones shifted), then the
  optional PatchMerging.  Returns (input of the next stage, this stage's
  output before its norm).

  The (regular, shifted) pairs are stored stacked (``pairs``) and run as
  one ``lax.scan``; an odd last block is a module of its own.  ``remat``
  ('none' | 'minimal' | 'full', models/remat.py) re-materialises each pair
  (and the odd block) in the backward pass.  ``scan``: the scan is a loop
  (a block pair traced once); False unrolls it.  Neither changes the
  numbers beyond float32 rounding.
  """
  depth: int
  drop_path_rates: Sequence[float] = ()
  downsample: bool = True
  patch_norm: bool = True
  remat: str = 'none'
  scan: bool = False

  @nn.compact
  def __call__(self, x, extent=None):
    """x (B, H, W, C); ``extent`` (B, 2) int: each image's (h, w) on this
    map (padding-invariant mode; ``SwinBlock``, ``PatchMerging``)."""
    opts = self.swin_block_options()
    policy = remat_lib.checkpoint_policy(self.remat)
    rates = tuple(self.drop_path_rates) or (0.0,) * self.depth
    num_pairs = self.depth // 2
    if num_pairs:
      pair_rates = np.asarray(rates[:2 * num_pairs], np.float32).reshape(
          num_pairs, 2)
      # Parameters do not depend on dropout: init deterministic.
      pairs = remat_lib.stacked_params(
          self, 'pairs', SwinBlockPair(**dict(opts, deterministic=True),
                                       parent=None),
          num_pairs, x, extent, pair_rates[0])
      rngs = None if self.deterministic else {
          DROP_RNG: self.make_rng(DROP_RNG)}
      x = remat_lib.scan_stacked(
          SwinBlockPair(**opts, parent=None), x, (extent,),
          {'params': pairs}, policy=policy, remat=self.remat != 'none',
          unroll=not self.scan, per_layer=(pair_rates,), rngs=rngs)
    if self.depth % 2:  # the odd last block: a regular one
      block_cls = SwinBlock
      if self.remat != 'none':
        block_cls = nn.remat(SwinBlock, policy=policy)
      x = block_cls(**opts, shift=False, drop_path_rate=rates[-1],
                    name=f'blocks_{self.depth - 1}')(x, None, extent)
    if not self.downsample:
      return x, x
    down = PatchMerging(2 * self.embed_dims, self.patch_norm,
                        name='downsample')(x, extent)
    return down, x


class SwinTransformer(nn.Module):
  """mmdet SwinTransformer (patch size 4, strides (4, 2, 2, 2)).

  Attributes mirror the reference's arguments; ``frozen_stages`` -1 freezes
  nothing.  ``with_cp`` re-materialises every block in the backward pass
  (the reference's torch.utils.checkpoint; policy 'full' unless ``remat``
  names another); ``remat`` is ``train.remat.backbone`` for the blocks of
  the trainable stages, ``scan`` is ``train.scan_layers`` (a stage's block
  pairs scanned, see SwinStage).  None of them changes the numbers.
  """
  embed_dims: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4
  patch_size: int = 4
  strides: Sequence[int] = (4, 2, 2, 2)
  out_indices: Sequence[int] = (0, 1, 2, 3)
  qkv_bias: bool = True
  qk_scale: float = 0.0
  patch_norm: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  frozen_stages: int = -1
  with_cp: bool = False
  remat: str = 'none'
  scan: bool = False

  @classmethod
  def from_config(cls, config) -> 'SwinTransformer':
    """Builds from ``config.backbone`` (type 'swin')."""
    b = config.backbone
    if bool(b.use_abs_pos_embed):
      raise ValueError('backbone.use_abs_pos_embed=True is not supported '
                       '(DDQ-DETR Swin configs use False)')
    return cls(embed_dims=int(b.embed_dims),
               depths=tuple(int(d) for d in b.depths),
               num_heads=tuple(int(h) for h in b.num_heads),
               window_size=int(b.window_size),
               mlp_ratio=float(b.mlp_ratio),
               patch_size=int(b.patch_size),
               strides=tuple(int(s) for s in b.strides),
               out_indices=tuple(int(i) for i in b.out_indices),
               qkv_bias=bool(b.qkv_bias),
               qk_scale=float(b.qk_scale or 0.0),
               patch_norm=bool(b.patch_norm),
               drop_rate=float(b.drop_rate),
               attn_drop_rate=float(b.attn_drop_rate),
               drop_path_rate=float(b.drop_path_rate),
               frozen_stages=param_groups.frozen_stage_count(config),
               with_cp=bool(b.with_cp),
               remat=remat_lib.remat_name(config, 'backbone'),
               scan=remat_lib.scan_layers(config))

  @property
  def out_channels(self) -> tuple[int, ...]:
    return swin_out_channels(embed_dims=self.embed_dims,
                             out_indices=self.out_indices)

  def _check(self):
    n = len(self.depths)
    if len(self.num_heads) != n or len(self.strides) != n:
      raise ValueError(f'depths {tuple(self.depths)}, num_heads '
                       f'{tuple(self.num_heads)} and strides '
                       f'{tuple(self.strides)} must have the same length')
    if self.strides[0] != self.patch_size:
      raise ValueError(f'strides[0] {self.strides[0]} must equal patch_size '
                       f'{self.patch_size} (non-overlapping patch embed)')
    if any(s != 2 for s in self.strides[1:]):
      raise ValueError(f'patch merging strides {tuple(self.strides[1:])}: '
                       'only 2 is supported')
    if not self.out_indices or max(self.out_indices) >= n:
      raise ValueError(f'out_indices {tuple(self.out_indices)} out of range '
                       f'for {n} stages')
    for i, h in enumerate(self.num_heads):
      if (self.embed_dims * 2**i) % h:
        raise ValueError(f'stage {i}: {self.embed_dims * 2**i} channels not '
                         f'divisible by {h} heads')

  def _block_remat(self) -> str:
    """The remat policy of a trainable stage's blocks."""
    if self.with_cp and self.remat == 'none':
      return 'full'
    return self.remat

  @property
  def out_strides(self) -> tuple[int, ...]:
    """Stride of each output (stage i: patch_size * 2**i)."""
    return tuple(self.patch_size * 2**i for i in self.out_indices)

  @nn.compact
  def __call__(self, x: jax.Array, extents: jax.Array | None = None
               ) -> list[jax.Array]:
    """x: (B, H, W, 3) NHWC -> [(B, h_i, w_i, embed * 2**i) for i in
    out_indices], h_0 = ceil(H / 4), h_{i+1} = ceil(h_i / 2).

    extents: optional (B, 2) int (h, w) of each image on the canvas
    (``extents.image_extents``): padding-invariant mode.  Each image's map
    at stage i is then its top-left ceil((h, w) / (4 * 2**i)) block, as
    the reference computes it for the image alone; outputs are 0 outside."""
    self._check()
    training = self.has_rng(DROP_RNG) and not self.is_initializing()
    frozen = self.frozen_stages
    stage_extent = lambda i: None if extents is None else extent_at_stride(
        extents, stride=self.patch_size * 2**i)
    if extents is not None:
      x = zero_outside(x, extent_valid(extents, stride=1, shape=x.shape[1:3]))
    x = PatchEmbed(self.embed_dims, self.patch_size, self.patch_norm,
                   name='patch_embed')(x)
    if training and frozen < 0:  # drop_after_pos (eval when frozen)
      x = nn.Dropout(self.drop_rate, deterministic=False,
                     rng_collection=DROP_RNG)(x)
    if frozen >= 0:
      x = jax.lax.stop_gradient(x)
    dpr = drop_path_rates(self.drop_path_rate, self.depths)
    outs = []
    channels = self.embed_dims
    for i, depth in enumerate(self.depths):
      stage_frozen = i < frozen
      first = sum(self.depths[:i])
      x, out = SwinStage(
          embed_dims=channels, num_heads=self.num_heads[i], depth=depth,
          feedforward_channels=int(self.mlp_ratio * channels),
          window_size=self.window_size, qkv_bias=self.qkv_bias,
          qk_scale=self.qk_scale, drop_rate=self.drop_rate,
          attn_drop_rate=self.attn_drop_rate,
          drop_path_rates=tuple(dpr[first:first + depth]),
          downsample=i < len(self.depths) - 1, patch_norm=self.patch_norm,
          deterministic=not training or stage_frozen,
          remat='none' if stage_frozen else self._block_remat(),
          scan=self.scan, name=f'stages_{i}')(x, stage_extent(i))
      if stage_frozen:
        x = jax.lax.stop_gradient(x)
        out = jax.lax.stop_gradient(out)
      channels = x.shape[-1]
      if i in self.out_indices:
        out = _layer_norm(f'norm{i}')(out)
        if extents is not None:
          out = zero_outside(out, extent_valid(
              extents, stride=self.patch_size * 2**i, shape=out.shape[1:3]))
        outs.append(jax.lax.stop_gradient(out) if stage_frozen else out)
    return outs
