"""Backbone selection from the config: ``config.backbone.type``.

    'resnet' -> ``backbone.ResNet`` (mmdet ResNet, style 'pytorch')
    'swin'   -> ``swin.SwinTransformer`` (mmdet SwinTransformer)

Both take (B, H, W, 3) NHWC images (and optionally each image's (h, w)
extent: padding-invariant inference, docs/PADDING.md) and return a list of
NHWC maps, one per ``out_indices``, with their strides in ``out_strides``;
the neck and everything above do not depend on the type.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from ddq_jax.model.resnet import ResNet, resnet_out_channels
from ddq_jax.model.swin import swin_out_channels, SwinTransformer

BACKBONE_TYPES = ('resnet', 'swin')


def backbone_type(config) -> str:
  """The config's backbone type, checked."""
  kind = str(config.backbone.type).lower()
  if kind not in BACKBONE_TYPES:
    raise ValueError(f'config.backbone.type {kind!r}: expected one of '
                     f'{BACKBONE_TYPES}')
  return kind


def build_backbone(config) -> nn.Module:
  """The backbone module of ``config`` (unbound; the detector names it
  ``backbone``)."""
  if backbone_type(config) == 'swin':
    return SwinTransformer.from_config(config)
  return ResNet.from_config(config)


def backbone_out_channels(config) -> tuple[int, ...]:
  """Channels of the backbone's outputs (the neck's ``in_channels``)."""
  b = config.backbone
  if backbone_type(config) == 'swin':
    return swin_out_channels(embed_dims=int(b.embed_dims),
                             out_indices=tuple(b.out_indices))
  return resnet_out_channels(depth=int(b.depth),
                             base_channels=int(b.base_channels),
                             out_indices=tuple(b.out_indices))

