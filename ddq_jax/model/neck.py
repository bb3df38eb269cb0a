"""ChannelMapper neck: mmdet 3.3.0 ``necks/channel_mapper.py``.

As configured by DDQ-DETR: every ConvModule is conv (no bias, because a norm
follows) + GroupNorm(eps 1e-5), no activation.  ``convs_{i}`` map backbone
level i to ``out_channels`` with a ``kernel_size`` conv (padding
(k-1)//2); when ``num_outs`` exceeds the inputs, ``extra_convs_0`` is a 3x3
stride-2 pad-1 conv on the BACKBONE's last output and ``extra_convs_{j>0}`` on
the previous extra output.  Names: convs_{i}/conv, convs_{i}/gn,
extra_convs_{j}/conv, extra_convs_{j}/gn.  NHWC in and out.

Padding invariance (``valid`` masks given, one per output level): GroupNorm
takes its statistics over the image's own extent only, the outputs are 0
outside it (the input of the next extra conv), as at batch 1 with no
padding.  Without masks: the reference's batched padding (statistics over
the whole canvas).

Init: ChannelMapper's init_cfg Xavier(uniform) on every conv (the
ConvModules' own kaiming init is overwritten; mmengine does not recurse into
the plain ModuleLists to re-run it); GN weight 1, bias 0.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax.model import conv as conv_lib
from ddq_jax.model import initializers as inits
from ddq_jax.model.extents import zero_outside


class ConvGN(nn.Module):
  """mmcv ConvModule(conv (bias=False), GN, act=None)."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  num_groups: int = 32
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None
               ) -> jax.Array:
    """x (B, h, w, C_in) -> (B, h', w', features); valid: optional
    (B, h', w') bool extent of the output (statistics over it only)."""
    k, p, s = self.kernel_size, self.padding, self.stride
    x = conv_lib.conv(self.features, k, s, p, 'conv',
                      kernel_init=inits.xavier_uniform,
                      trainable=True)(x)
    x = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.eps,
                     use_fast_variance=False, name='gn')(
                         x, mask=None if valid is None else
                         jnp.broadcast_to(valid[..., None], x.shape))
    return zero_outside(x, valid)


class ChannelMapper(nn.Module):
  """Attributes:
    out_channels: the transformer width (config.embed_dims).
    num_outs: number of output levels (config.num_levels), >= len(inputs).
    kernel_size: of the per-level mapping convs (config.neck.kernel_size).
    num_groups: GroupNorm groups (config.neck.num_groups).
  """
  out_channels: int = 256
  num_outs: int = 4
  kernel_size: int = 1
  num_groups: int = 32

  @classmethod
  def from_config(cls, config) -> 'ChannelMapper':
    return cls(out_channels=int(config.embed_dims),
               num_outs=int(config.num_levels),
               kernel_size=int(config.neck.kernel_size),
               num_groups=int(config.neck.num_groups))

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array],
               valid_fn: Optional[Callable[[int, tuple], jax.Array]] = None
               ) -> list[jax.Array]:
    """inputs: [(B, h_i, w_i, C_i)] -> [(B, h_l, w_l, out_channels)] * num_outs.

    valid_fn: optional ``(level, (h_l, w_l)) -> (B, h_l, w_l) bool`` image
    extent of output level l (padding-invariant mode; inputs are then 0
    outside their extents)."""
    if self.num_outs < len(inputs):
      raise ValueError(f'num_outs {self.num_outs} < {len(inputs)} inputs')
    valid = lambda lvl, shape: None if valid_fn is None else valid_fn(
        lvl, shape)
    outs = [
        ConvGN(self.out_channels, self.kernel_size,
               padding=(self.kernel_size - 1) // 2,
               num_groups=self.num_groups, name=f'convs_{i}')(
                   x, valid(i, x.shape[1:3]))
        for i, x in enumerate(inputs)
    ]
    for j in range(self.num_outs - len(inputs)):
      src = inputs[-1] if j == 0 else outs[-1]
      shape = ((src.shape[1] + 1) // 2, (src.shape[2] + 1) // 2)
      outs.append(ConvGN(self.out_channels, 3, stride=2, padding=1,
                         num_groups=self.num_groups,
                         name=f'extra_convs_{j}')(
                             src, valid(len(inputs) + j, shape)))
    return outs
