"""Swin's (shifted) window attention: mmdet 3.3.0 ``backbones/swin.py``
``WindowMSA`` and ``ShiftWindowMSA``.

* ``WindowMSA``: multi-head self-attention inside each window with the
  relative position bias; the shifted windows' regions get the reference's
  additive -100 across regions.
* ``ShiftWindowMSA``: pads the (normed) map bottom / right with zeros to
  whole windows (the padded tokens are keys in the attention: no mask hides
  them), rolls by ``shift_size`` (``window // 2`` in the odd blocks) with
  the -100 mask computed on the padded map, attends, rolls back, crops.

Padding invariance (``extent`` given: each image's (h, w) at this map's
resolution): the map is zeroed outside each image's extent, padded to the
canvas's whole windows, and the roll and the regions are those of each
image's own padded map (``swin_windows.per_image_roll``,
``shifted_window_regions``), so every window inside an image's own padded
map holds what the reference's batch-1 run of that image holds.  The
windows past it hold values that only land outside the extent.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax.model.drop_path import drop_path
from ddq_jax.model.extents import extent_valid, zero_outside
from ddq_jax.model.swin_windows import pad_bottom_right, padded_to_window, per_image_roll, relative_position_index, shifted_window_mask, shifted_window_regions, window_partition, window_reverse

DROP_RNG = 'dropout'
MASK_VALUE = -100.0  # the reference's mask across regions, not -inf

_trunc_normal_02 = nn.initializers.truncated_normal(0.02, lower=-100.0,
                                                    upper=100.0)


def dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
  """Linear as the reference initialises it: weight trunc normal std 0.02,
  bias 0."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=_trunc_normal_02,
                  bias_init=nn.initializers.zeros, name=name)


class WindowMSA(nn.Module):
  """Window multi-head self-attention with the relative position bias."""
  embed_dims: int
  num_heads: int
  window_size: int
  qkv_bias: bool = True
  qk_scale: float = 0.0   # 0 (or None): head_dim ** -0.5, as the reference
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask=None, regions=None):
    """x (B*nW, N, C) -> (B*nW, N, C).  ``mask`` (nW, N, N) additive, the
    same for every image, or ``regions`` (B*nW, N) int: -100 between tokens
    of different regions of a window; neither: no mask."""
    bn, n, c = x.shape
    h = self.num_heads
    w = self.window_size
    table = self.param('relative_position_bias_table', nn.initializers.zeros,
                       ((2 * w - 1) * (2 * w - 1), h), jnp.float32)
    qkv = dense(3 * c, 'qkv', self.qkv_bias)(x)
    qkv = qkv.reshape(bn, n, 3, h, c // h).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = self.qk_scale or (c // h) ** -0.5
    attn = jnp.einsum('bhnd,bhmd->bhnm', q * scale, k)
    index = relative_position_index(w).reshape(-1)
    bias = table[index].reshape(n, n, h).transpose(2, 0, 1)
    attn = attn + bias[None].astype(attn.dtype)
    if mask is not None:
      nw = mask.shape[0]
      attn = attn.reshape(bn // nw, nw, h, n, n) + jnp.asarray(
          mask, attn.dtype)[None, :, None]
      attn = attn.reshape(bn, h, n, n)
    if regions is not None:
      across = regions[:, None, :, None] != regions[:, None, None, :]
      attn = attn + jnp.where(across, MASK_VALUE, 0.0).astype(attn.dtype)
    attn = jax.nn.softmax(attn, axis=-1)
    attn = nn.Dropout(self.attn_drop_rate, deterministic=self.deterministic,
                      rng_collection=DROP_RNG)(attn)
    out = jnp.einsum('bhnm,bhmd->bnhd', attn, v).reshape(bn, n, c)
    out = dense(c, 'proj')(out)
    return nn.Dropout(self.proj_drop_rate, deterministic=self.deterministic,
                      rng_collection=DROP_RNG)(out)


class WindowAttentionOptions(nn.Module, kw_only=True):
  """The attributes a Swin stage hands on to its blocks, and a block to its
  ShiftWindowMSA."""
  embed_dims: int
  num_heads: int
  window_size: int = 7
  qkv_bias: bool = True
  qk_scale: float = 0.0
  attn_drop_rate: float = 0.0
  deterministic: bool = True

  def window_attention_options(self) -> dict:
    """These attributes as keyword arguments."""
    return dict(embed_dims=self.embed_dims, num_heads=self.num_heads,
                window_size=self.window_size, qkv_bias=self.qkv_bias,
                qk_scale=self.qk_scale, attn_drop_rate=self.attn_drop_rate,
                deterministic=self.deterministic)


class ShiftWindowMSA(WindowAttentionOptions, kw_only=True):
  """(S)W-MSA on a (B, H, W, C) map, with window padding and drop-path."""
  shift_size: int = 0
  proj_drop_rate: float = 0.0
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x, drop_path_rate=None, extent=None):
    """x (B, H, W, C) -> (B, H, W, C); ``drop_path_rate`` (traced scalar)
    overrides the attribute (a scanned block's rate); ``extent`` (B, 2)
    int: each image's (h, w) on this map (padding-invariant mode)."""
    b, h, w, c = x.shape
    ws, s = self.window_size, self.shift_size
    if not 0 <= s < ws:
      raise ValueError(f'shift_size {s} must be in [0, window {ws})')
    if extent is not None:
      x = zero_outside(x, extent_valid(extent, stride=1, shape=(h, w)))
    x = pad_bottom_right(x, ws)
    h_pad, w_pad = x.shape[1], x.shape[2]
    mask = regions = padded = None
    if s > 0 and extent is None:
      x = jnp.roll(x, shift=(-s, -s), axis=(1, 2))
      mask = shifted_window_mask(h_pad, w_pad, window=ws, shift=s)
    elif s > 0:
      padded = padded_to_window(extent, window=ws)
      x = per_image_roll(x, padded, shift=-s)
      regions = shifted_window_regions(padded, shape=(h_pad, w_pad),
                                       window=ws, shift=s)
    windows = window_partition(x, ws).reshape(-1, ws * ws, c)
    windows = WindowMSA(
        embed_dims=self.embed_dims, num_heads=self.num_heads, window_size=ws,
        qkv_bias=self.qkv_bias, qk_scale=self.qk_scale,
        attn_drop_rate=self.attn_drop_rate,
        proj_drop_rate=self.proj_drop_rate, deterministic=self.deterministic,
        name='w_msa')(windows, mask, regions)
    x = window_reverse(windows.reshape(-1, ws, ws, c), h_pad, w_pad)
    if s > 0 and extent is None:
      x = jnp.roll(x, shift=(s, s), axis=(1, 2))
    elif s > 0:
      x = per_image_roll(x, padded, shift=s)
    x = x[:, :h, :w, :]
    rng = None if self.deterministic else self.make_rng(DROP_RNG)
    rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
    return drop_path(x, rate=rate, rng=rng)
