"""Window geometry of the Swin Transformer (mmdet 3.3.0 ``backbones/swin.py``):
pure functions on NHWC maps and numpy index / mask tables, no parameters.

* ``relative_position_index``: WindowMSA's index into the bias table;
* ``window_partition`` / ``window_reverse``: map <-> row-major windows;
* ``shifted_window_mask``: SW-MSA's -100 mask of the shifted regions;
* ``pad_bottom_right``: AdaptivePadding 'corner' (and a block's padding to
  whole windows);
* ``unfold_2x2``: PatchMerging's nn.Unfold in its channel order.

Per image (padding invariance, docs/PADDING.md): on a canvas each image's
map is the top-left ``extent`` block; the reference, run on that image
alone, pads it to its own whole windows and rolls that padded map.  These
take (B, 2) per-image sizes as arrays (static shapes):

* ``padded_to_window``: an extent padded to whole windows;
* ``per_image_roll``: ``jnp.roll`` of each image's own padded map, on the
  canvas map;
* ``shifted_window_regions``: the regions whose differences make the -100
  mask, from each image's own padded size, window by window.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def relative_position_index(window: int) -> np.ndarray:
  """(w*w, w*w) int32 index into the (2w-1)^2 bias table, built as the
  reference's ``WindowMSA`` does (double_step_seq, then flip(1))."""
  seq1 = np.arange(0, (2 * window - 1) * window, 2 * window - 1)
  seq2 = np.arange(0, window, 1)
  coords = (seq1[:, None] + seq2[None, :]).reshape(1, -1)
  return np.ascontiguousarray((coords + coords.T)[:, ::-1]).astype(np.int32)


def window_partition(x, window: int):
  """(B, H, W, C) -> (B * nW, window, window, C), windows row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def window_reverse(windows, h: int, w: int):
  """(B * nW, window, window, C) -> (B, H, W, C)."""
  window = windows.shape[1]
  c = windows.shape[-1]
  b = windows.shape[0] // ((h // window) * (w // window))
  x = windows.reshape(b, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def shifted_window_mask(h_pad: int, w_pad: int, *, window: int,
                        shift: int) -> np.ndarray:
  """(nW, N, N) float32 additive mask of SW-MSA on the padded map: 0 within
  a region, -100 across regions (the reference's value, not -inf)."""
  img_mask = np.zeros((1, h_pad, w_pad, 1), np.float32)
  slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  cnt = 0
  for hs in slices:
    for ws in slices:
      img_mask[:, hs, ws, :] = cnt
      cnt += 1
  windows = window_partition(img_mask, window).reshape(-1, window * window)
  diff = windows[:, None, :] - windows[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def pad_bottom_right(x, multiple: int):
  """(B, H, W, C) zero-padded at the bottom / right to multiples of
  ``multiple`` (AdaptivePadding 'corner' with kernel = stride)."""
  h, w = x.shape[1], x.shape[2]
  pad_h, pad_w = (-h) % multiple, (-w) % multiple
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  return x


def unfold_2x2(x):
  """(B, H, W, C), H and W even -> (B, H/2, W/2, 4C) in nn.Unfold's order:
  channel c * 4 + kh * 2 + kw."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, 4 * c)


def padded_to_window(extent, *, window: int):
  """(B, 2) int (h, w) -> (B, 2) rounded up to multiples of ``window``."""
  return (extent + (window - 1)) // window * window


def _roll_index(padded, *, size: int, shift: int):
  """(B,) per-image length p -> (B, size) source index of ``jnp.roll`` by
  ``shift`` over [0, p): (i - shift) mod p for i < p, else i."""
  i = jnp.arange(size, dtype=jnp.int32)[None, :]
  p = padded[:, None].astype(jnp.int32)
  return jnp.where(i < p, jnp.mod(i - shift, p), i)


def per_image_roll(x, padded, *, shift: int):
  """x (B, H, W, C), padded (B, 2) int (h_p, w_p) <= (H, W) -> x with each
  image's top-left (h_p, w_p) block rolled by ``shift`` along both axes
  (``jnp.roll(block, (shift, shift), (0, 1))``); the positions outside
  it only exchange values among themselves."""
  rows = _roll_index(padded[:, 0], size=x.shape[1], shift=shift)
  cols = _roll_index(padded[:, 1], size=x.shape[2], shift=shift)
  return jax.vmap(lambda xi, r, c: xi[r][:, c])(x, rows, cols)


def _axis_region(padded, *, size: int, window: int, shift: int):
  """(B,) per-image length p -> (B, size) int32 region of each position
  along one axis of the shifted map: slices (0, -window), (-window,
  -shift), (-shift, None) of [0, p) give 0, 1, 2."""
  i = jnp.arange(size, dtype=jnp.int32)[None, :]
  p = padded[:, None].astype(jnp.int32)
  return ((i >= p - window).astype(jnp.int32)
          + (i >= p - shift).astype(jnp.int32))


def shifted_window_regions(padded, *, shape, window: int, shift: int):
  """(B, 2) int per-image padded (h_p, w_p), static map ``shape`` (H, W),
  multiples of the window -> (B * nW, window * window) int32 region of each
  token, windows row-major as ``window_partition``.  Within the image's own
  windows, tokens of different regions get the reference's -100
  (``shifted_window_mask`` of (h_p, w_p))."""
  h, w = int(shape[0]), int(shape[1])
  rows = _axis_region(padded[:, 0], size=h, window=window, shift=shift)
  cols = _axis_region(padded[:, 1], size=w, window=window, shift=shift)
  region = rows[:, :, None] * 3 + cols[:, None, :]
  return window_partition(region[..., None], window).reshape(
      -1, window * window)
