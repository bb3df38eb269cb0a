"""ResNet backbone: mmdet 3.3.0 ``backbones/resnet.py`` with style='pytorch'.

Eval-mode (frozen) BatchNorm everywhere, as the reference's
``norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True``: the
statistics live in the ``batch_stats`` collection (``mean``, ``var``) and the
affine parameters (``scale``, ``bias``) in ``params``.  Submodules are named
by the project's naming rule so a converted checkpoint loads as is:

    conv1, bn1, layer1_0/{conv1,bn1,conv2,bn2,conv3,bn3,downsample_0,
    downsample_1}, layer1_tail/..., layer4_0/..., layer4_tail/...

A stage's blocks after its first are identical: they are stored stacked
(``layer{i}_tail``, every leaf with a leading axis; torch's
``layer{i}.{j}`` is entry j - 1, io/conversion/mapping.py) and run as one
scan.

Input NHWC float32, outputs a list of NHWC maps, one per ``out_indices``.

Padding invariance (``extents`` given): the input of every layer that mixes
space (7x7 stem, max-pool, each 3x3 conv) is zeroed outside the image's own
extent at that resolution (``models/extents.py``), so a padded canvas gives
the unpadded image's maps in its top-left block.  ``extents=None`` is the
reference's batched padding (activations outside the image leak in).

Init (mmdet ResNet with ``pretrained=None``, ``init_cfg=None``): every conv
kaiming normal (fan_out, relu), every BN weight 1 / bias 0 (stats 0 / 1),
and with ``zero_init_residual`` (the reference's default True) the last BN
of each block (bn3 / bn2) weight 0, bias 0.  A real run loads the
torchvision weights over this (``init_from``).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax.model import conv as conv_lib
from ddq_jax.model import initializers as inits
from ddq_jax.model.extents import extent_valid, zero_outside
from ddq_jax.model import param_groups
from ddq_jax.model import remat as remat_lib

# depth -> (block type, blocks per stage); the reference's arch_settings.
ARCH_SETTINGS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
EXPANSION = {'basic': 1, 'bottleneck': 4}
BN_EPS = 1e-5  # torch BatchNorm2d's default


def resnet_out_channels(*, depth: int, base_channels: int,
                        out_indices: Sequence[int]) -> tuple[int, ...]:
  """Channels of the backbone's outputs (the neck's ``in_channels``)."""
  if depth not in ARCH_SETTINGS:
    raise KeyError(f'invalid depth {depth} for resnet; '
                   f'expected one of {sorted(ARCH_SETTINGS)}')
  expansion = EXPANSION[ARCH_SETTINGS[depth][0]]
  return tuple(base_channels * 2**i * expansion for i in out_indices)


def _conv(features: int, kernel: int, stride: int, padding: int,
          name: str, *, trainable: bool = False, in_loop: bool = False
          ) -> nn.Module:
  """torch Conv2d(bias=False), kaiming-normal init (``model/conv.py``)."""
  return conv_lib.conv(features, kernel, stride, padding, name,
                       kernel_init=inits.kaiming_normal_fan_out,
                       trainable=trainable, in_loop=in_loop)


def _valid(extents, stride, x):
  """(B, h, w) extent mask of an NHWC map at ``stride``, None without
  extents."""
  if extents is None:
    return None
  return extent_valid(extents, stride=stride, shape=x.shape[1:3])


def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """torch ``MaxPool2d(3, stride=2, padding=1)`` on (B, H, W, C): pads with
  -inf, then the max of the 9 strided shifts (the values of nn.max_pool's
  reduce_window; ONNX exporters turn this into plain Slice / Max, while a
  rank-4 reduce_window becomes a MaxPool that runtimes reject).
  Returns (B, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C)."""
  b, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)),
               constant_values=-jnp.inf)
  out = None
  for dy in range(3):
    for dx in range(3):
      v = jax.lax.slice(xp, (0, dy, dx, 0),
                        (b, dy + 2 * (ho - 1) + 1, dx + 2 * (wo - 1) + 1, c),
                        (1, 2, 2, 1))
      out = v if out is None else jnp.maximum(out, v)
  return out


class FrozenBatchNorm(nn.Module):
  """BatchNorm2d in eval mode over the last (channel) axis.

  y = (x - mean) / sqrt(var + eps) * scale + bias, statistics never updated.
  ``affine_trainable=False`` (the reference's ``requires_grad=False``) stops
  the gradient of ``scale`` / ``bias``.
  """
  eps: float = BN_EPS
  affine_trainable: bool = False
  zero_init: bool = False  # scale initialised to 0 (zero_init_residual)
  # Read the folded form ``fold_frozen_bn`` made (params 'mul', 'shift';
  # scanned blocks: two stacked arrays per BN instead of four).
  folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if self.folded:
      mul = self.param('mul', inits.ones, (c,), jnp.float32)
      shift = self.param('shift', nn.initializers.zeros, (c,), jnp.float32)
      return (x * mul + shift).astype(x.dtype)
    scale = self.param('scale',
                       inits.zeros if self.zero_init else inits.ones, (c,),
                       jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.variable('batch_stats', 'mean',
                         lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable('batch_stats', 'var',
                        lambda: jnp.ones((c,), jnp.float32)).value
    mul, shift = fold_frozen_bn(
        {'scale': scale, 'bias': bias}, {'mean': mean, 'var': var},
        eps=self.eps, trainable=self.affine_trainable)
    return (x * mul + shift).astype(x.dtype)


def fold_frozen_bn(params: dict, stats: dict, *, eps: float = BN_EPS,
                   trainable: bool = False) -> tuple[jax.Array, jax.Array]:
  """A frozen BatchNorm as y = x * mul + shift: (mul, shift), each (C,)."""
  scale, bias = params['scale'], params['bias']
  if not trainable:
    scale = jax.lax.stop_gradient(scale)
    bias = jax.lax.stop_gradient(bias)
  mean = jax.lax.stop_gradient(stats['mean'])
  var = jax.lax.stop_gradient(stats['var'])
  mul = scale * jax.lax.rsqrt(var + eps)
  return mul, bias - mean * mul


def fold_block_bns(params: dict, stats: dict, *, trainable: bool) -> dict:
  """A block's params with every BatchNorm (a subtree holding 'scale' and
  'bias', its statistics in ``stats``) as {'mul', 'shift'}."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict) and set(v) == {'scale', 'bias'}:
      mul, shift = fold_frozen_bn(v, stats[k], trainable=trainable)
      out[k] = {'mul': mul, 'shift': shift}
    else:
      out[k] = v
  return out


class _ResidualBlock(nn.Module):
  """What BasicBlock and Bottleneck share: their attributes, the frozen BN,
  the extents masking and the (downsampled) identity + ReLU."""
  planes: int
  stride: int = 1
  with_downsample: bool = False
  bn_trainable: bool = False
  zero_init_residual: bool = True
  in_stride: int = 1  # stride of the block's input (padding invariance)
  frozen: bool = False  # no gradients (a frozen stage)
  in_loop: bool = False  # run inside a scan (conv weight gradients: _conv)
  folded_bn: bool = False  # BatchNorms read folded (FrozenBatchNorm.folded)

  def conv(self, features: int, kernel: int, stride: int, padding: int,
           name: str) -> nn.Module:
    return _conv(features, kernel, stride, padding, name,
                 trainable=not self.frozen, in_loop=self.in_loop)

  def bn(self, name: str, zero: bool = False) -> FrozenBatchNorm:
    return FrozenBatchNorm(affine_trainable=self.bn_trainable,
                           zero_init=zero, folded=self.folded_bn, name=name)

  def masked(self, y: jax.Array, extents: jax.Array | None,
             stride: int = 1) -> jax.Array:
    """Zero ``y`` outside the image; ``y``'s stride is in_stride * stride."""
    return zero_outside(y, _valid(extents, self.in_stride * stride, y))

  def residual(self, out: jax.Array, x: jax.Array,
               channels: int) -> jax.Array:
    """relu(out + identity), identity = x or its 1x1 / BN downsample."""
    identity = x
    if self.with_downsample:
      identity = self.conv(channels, 1, self.stride, 0, 'downsample_0')(x)
      identity = self.bn('downsample_1')(identity)
    return nn.relu(out + identity)


class BasicBlock(_ResidualBlock):
  """Two 3x3 convs (ResNet-18/34); stride on conv1."""

  @nn.compact
  def __call__(self, x: jax.Array, extents: jax.Array | None = None
               ) -> jax.Array:
    """extents: optional (B, 2) image (h, w): zero outside it before every
    3x3 conv (x's stride is ``in_stride``)."""
    x = self.masked(x, extents)
    out = self.conv(self.planes, 3, self.stride, 1, 'conv1')(x)
    out = nn.relu(self.bn('bn1')(out))
    out = self.masked(out, extents, self.stride)
    out = self.conv(self.planes, 3, 1, 1, 'conv2')(out)
    out = self.bn('bn2', self.zero_init_residual)(out)
    return self.residual(out, x, self.planes)


class Bottleneck(_ResidualBlock):
  """1x1 -> 3x3 (stride here, 'pytorch' style) -> 1x1 (x4 channels)."""

  @nn.compact
  def __call__(self, x: jax.Array, extents: jax.Array | None = None
               ) -> jax.Array:
    """extents: optional (B, 2) image (h, w): zero outside it before every
    3x3 conv (x's stride is ``in_stride``)."""
    out = self.conv(self.planes, 1, 1, 0, 'conv1')(x)
    out = nn.relu(self.bn('bn1')(out))
    out = self.masked(out, extents)
    out = self.conv(self.planes, 3, self.stride, 1, 'conv2')(out)
    out = nn.relu(self.bn('bn2')(out))
    out = self.conv(self.planes * 4, 1, 1, 0, 'conv3')(out)
    out = self.bn('bn3', self.zero_init_residual)(out)
    return self.residual(out, x, self.planes * 4)


class ResNet(nn.Module):
  """mmdet ResNet (style='pytorch', num_stages=4, no deep stem / avg_down).

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    base_channels: width of the stem and of stage 1 (64 for the real model).
    out_indices: which stages (0-based) to return.
    frozen_stages: -1 none; k >= 0 freezes the stem and stages 1..k (their
      outputs pass through ``stop_gradient``, so they get no gradient).
    bn_trainable: False (the reference's BN ``requires_grad=False``) stops
      the gradient of every BatchNorm's scale and bias.
    zero_init_residual: init only: each block's last BN scale starts at 0
      (the reference's default True; config.backbone.zero_init_residual).
  """
  depth: int = 50
  base_channels: int = 64
  out_indices: Sequence[int] = (1, 2, 3)
  frozen_stages: int = 1
  bn_trainable: bool = False
  num_stages: int = 4
  zero_init_residual: bool = True
  # 'none' | 'minimal' | 'full' per trainable block (ddq_jax/model/remat.py);
  # frozen stages keep nothing for the backward pass anyway.
  remat: str = 'none'
  # Blocks 1.. of a stage: a scan loop (train.scan_layers), or unrolled.
  scan: bool = True

  @classmethod
  def from_config(cls, config) -> 'ResNet':
    """Builds from ``config.backbone`` (depth, base_channels, out_indices);
    the frozen stages are those ``param_groups.param_rules`` freezes."""
    b = config.backbone
    return cls(depth=int(b.depth), base_channels=int(b.base_channels),
               out_indices=tuple(int(i) for i in b.out_indices),
               frozen_stages=param_groups.frozen_stage_count(config),
               zero_init_residual=bool(b.zero_init_residual),
               bn_trainable=bool(b.bn_trainable),
               remat=remat_lib.remat_name(config, 'backbone'),
               scan=remat_lib.scan_layers(config))

  @property
  def out_channels(self) -> tuple[int, ...]:
    return resnet_out_channels(depth=self.depth,
                               base_channels=self.base_channels,
                               out_indices=self.out_indices)

  @property
  def out_strides(self) -> tuple[int, ...]:
    """Stride of each output (stage i: 4 * 2**i)."""
    return tuple(4 * 2**i for i in self.out_indices)

  @nn.compact
  def __call__(self, x: jax.Array, extents: jax.Array | None = None
               ) -> list[jax.Array]:
    """x: (B, H, W, 3) NHWC -> [(B, h_i, w_i, C_i) for i in out_indices].

    extents: optional (B, 2) int (h, w) of each image on the canvas
    (``extents.image_extents``): padding-invariant mode."""
    valid = lambda y, stride: _valid(extents, stride, y)

    if self.depth not in ARCH_SETTINGS:
      raise KeyError(f'invalid depth {self.depth} for resnet')
    if not 1 <= self.num_stages <= 4 or max(self.out_indices) >= self.num_stages:
      raise ValueError(f'bad num_stages {self.num_stages} / out_indices '
                       f'{tuple(self.out_indices)}')
    kind, stage_blocks = ARCH_SETTINGS[self.depth]
    block_cls = BasicBlock if kind == 'basic' else Bottleneck
    expansion = EXPANSION[kind]
    remat_cls = block_cls
    if self.remat != 'none':
      remat_cls = nn.remat(block_cls,
                           policy=remat_lib.checkpoint_policy(self.remat))

    x = zero_outside(x, valid(x, 1))
    x = _conv(self.base_channels, 7, 2, 3, 'conv1')(x)
    x = FrozenBatchNorm(affine_trainable=self.bn_trainable, name='bn1')(x)
    x = nn.relu(x)
    # Valid values are >= 0 after the ReLU: zeros outside the image never
    # win the max, as the -inf of the unpadded image's border.
    x = zero_outside(x, valid(x, 2))
    x = max_pool_3x3_s2(x)
    if self.frozen_stages >= 0:
      x = jax.lax.stop_gradient(x)

    outs = []
    inplanes = self.base_channels
    stride_now = 4
    for i, num_blocks in enumerate(stage_blocks[:self.num_stages]):
      planes = self.base_channels * 2**i
      stride = 1 if i == 0 else 2
      frozen = i + 1 <= self.frozen_stages
      block_kw = dict(planes=planes, bn_trainable=self.bn_trainable,
                      zero_init_residual=self.zero_init_residual)
      # Block 0 (stride, downsample) differs; blocks 1.. are identical:
      # stored stacked (layer{i}_tail) and scanned, their BatchNorms read
      # folded to (mul, shift).
      s = stride
      with_ds = s != 1 or inplanes != planes * expansion
      x = (block_cls if frozen else remat_cls)(
          stride=s, with_downsample=with_ds, in_stride=stride_now,
          frozen=frozen, name=f'layer{i + 1}_0', **block_kw)(x, extents)
      stride_now *= s
      inplanes = planes * expansion
      if num_blocks > 1:
        tail = remat_lib.stacked_variables(
            self, f'layer{i + 1}_tail',
            block_cls(in_stride=stride_now, parent=None, **block_kw),
            num_blocks - 1, x, extents,
            layer_names=[f'layer{i + 1}_{j}' for j in range(1, num_blocks)])
        folded = jax.vmap(functools.partial(
            fold_block_bns, trainable=self.bn_trainable))(
                tail['params'], tail['batch_stats'])
        x = remat_lib.scan_stacked(
            block_cls(in_stride=stride_now, frozen=frozen, in_loop=self.scan,
                      folded_bn=True, parent=None, **block_kw), x,
            (extents,), {'params': folded},
            policy=remat_lib.checkpoint_policy(self.remat),
            remat=self.remat != 'none' and not frozen, unroll=not self.scan)
      if i + 1 <= self.frozen_stages:
        x = jax.lax.stop_gradient(x)
      if i in self.out_indices:
        outs.append(zero_outside(x, valid(x, stride_now)))
    return outs
