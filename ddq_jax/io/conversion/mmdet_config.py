"""Reads an mmdetection config *text* safely (never exec) into our config.

mmengine checkpoints carry the full config as Python source in
``meta['cfg']``.  We parse it with ``ast`` and evaluate only literals,
``dict(...)`` calls, tuples, lists and unary minus; anything else (names,
attribute access such as ``_base_.backend_args``) becomes ``None``.
"""
from __future__ import annotations

import ast
from typing import Any

import ml_collections

from ddq_jax.config import load_config
from ddq_jax.io.conversion.swin import swin_backbone_config


class ConfigParseError(ValueError):
  """The config text is not an mmdetection DDQ-DETR config we understand."""


def _literal(node: ast.AST) -> Any:
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, (ast.List, ast.Tuple)):
    items = [_literal(e) for e in node.elts]
    return items if isinstance(node, ast.List) else tuple(items)
  if isinstance(node, ast.Dict):
    return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)
            if k is not None}
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and node.func.id == 'dict' and not node.args):
    return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
    value = _literal(node.operand)
    return -value if isinstance(value, (int, float)) else None
  if isinstance(node, ast.BinOp):  # e.g. 2 * 3 in hand-written configs
    left, right = _literal(node.left), _literal(node.right)
    if isinstance(left, (int, float)) and isinstance(right, (int, float)):
      ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
             ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
             ast.FloorDiv: lambda a, b: a // b}
      if type(node.op) in ops:
        return ops[type(node.op)](left, right)
  return None


def parse_config_text(text: str) -> dict[str, Any]:
  """Top-level assignments of a config file as plain Python values."""
  try:
    tree = ast.parse(text)
  except SyntaxError as e:
    raise ConfigParseError(f'config text is not valid Python: {e}') from None
  out: dict[str, Any] = {}
  for stmt in tree.body:
    if isinstance(stmt, ast.Assign):
      value = _literal(stmt.value)
      for target in stmt.targets:
        if isinstance(target, ast.Name):
          out[target.id] = value
  return out


def _get(d: dict, path: str, default=None):
  node: Any = d
  for key in path.split('.'):
    if not isinstance(node, dict) or key not in node:
      return default
    node = node[key]
  return default if node is None else node


def config_from_mmdet(text: str,
                      base: str = 'ddq_r50_4scale') -> ml_collections.ConfigDict:
  """Our config for the model described by an mmdetection config text.

  Every architectural size is read from the text; training and data settings
  keep the defaults of ``configs/<base>.py``.
  """
  cfg = parse_config_text(text)
  model = cfg.get('model')
  if not isinstance(model, dict):
    raise ConfigParseError('config text has no `model = dict(...)`')
  if model.get('type') != 'DDQDETR':
    raise ConfigParseError(
        f"checkpoint is a {model.get('type')!r} model; expected 'DDQDETR'")
  backbone = model.get('backbone') or {}
  if backbone.get('type') not in ('ResNet', 'SwinTransformer'):
    raise ConfigParseError(
        f"backbone {backbone.get('type')!r} is not supported; expected "
        "'ResNet' or 'SwinTransformer'")
  if backbone.get('type') == 'SwinTransformer':
    base = 'ddq_swinl_4scale' if base == 'ddq_r50_4scale' else base
  elif backbone.get('style', 'pytorch') != 'pytorch':
    raise ConfigParseError(f"ResNet style {backbone.get('style')!r}; expected "
                           "'pytorch'")
  c = load_config(base)
  enc_attn = _get(model, 'encoder.layer_cfg.self_attn_cfg', {})
  dec_attn = _get(model, 'decoder.layer_cfg.self_attn_cfg', {})
  c.embed_dims = int(enc_attn.get('embed_dims', 256))
  c.num_heads = int(dec_attn.get('num_heads', 8))
  if int(enc_attn.get('num_heads', 8)) != c.num_heads:
    raise ConfigParseError('encoder and decoder head counts differ; '
                           'unsupported')
  c.num_levels = int(model.get('num_feature_levels',
                               enc_attn.get('num_levels', 4)))
  c.num_points = int(enc_attn.get('num_points', 4))
  c.num_encoder_layers = int(_get(model, 'encoder.num_layers', 6))
  c.num_decoder_layers = int(_get(model, 'decoder.num_layers', 6))
  c.ffn_dims = int(_get(model, 'encoder.layer_cfg.ffn_cfg.feedforward_channels',
                        1024))
  c.num_queries = int(model.get('num_queries', 900))
  c.dense_topk_ratio = float(model.get('dense_topk_ratio', 1.5))
  c.nms_iou_threshold = float(_get(model, 'dqs_cfg.iou_threshold', 0.8))
  c.max_per_img = int(_get(model, 'test_cfg.max_per_img', 100))
  c.num_classes = int(_get(model, 'bbox_head.num_classes', 80))
  c.pos_temperature = float(_get(model, 'positional_encoding.temperature', 20))
  c.pos_offset = float(_get(model, 'positional_encoding.offset', 0.0))
  pos_feats = _get(model, 'positional_encoding.num_feats', c.embed_dims // 2)
  if 2 * int(pos_feats) != c.embed_dims:
    raise ConfigParseError(f'positional num_feats {pos_feats} must be half of '
                           f'embed_dims {c.embed_dims}')
  if backbone.get('type') == 'SwinTransformer':
    try:
      swin_backbone_config(backbone, c.backbone)
    except ValueError as e:
      raise ConfigParseError(str(e)) from None
  else:
    c.backbone.depth = int(backbone.get('depth', 50))
    c.backbone.base_channels = int(backbone.get('base_channels', 64))
    c.backbone.out_indices = tuple(int(i) for i in
                                   backbone.get('out_indices', (1, 2, 3)))
    c.backbone.frozen_stages = int(backbone.get('frozen_stages', 1))
  c.neck.num_groups = int(_get(model, 'neck.norm_cfg.num_groups', 32))
  c.neck.kernel_size = int(_get(model, 'neck.kernel_size', 1))
  c.dn.num_dn_queries = int(_get(model, 'dn_cfg.group_cfg.num_dn_queries', 100))
  c.dn.label_noise_scale = float(_get(model, 'dn_cfg.label_noise_scale', 0.5))
  c.dn.box_noise_scale = float(_get(model, 'dn_cfg.box_noise_scale', 1.0))
  head = model.get('bbox_head') or {}
  c.loss.cls_weight = float(_get(head, 'loss_cls.loss_weight', 1.0))
  c.loss.focal_alpha = float(_get(head, 'loss_cls.alpha', 0.25))
  c.loss.focal_gamma = float(_get(head, 'loss_cls.gamma', 2.0))
  c.loss.bbox_weight = float(_get(head, 'loss_bbox.loss_weight', 5.0))
  c.loss.iou_weight = float(_get(head, 'loss_iou.loss_weight', 2.0))
  mean = _get(model, 'data_preprocessor.mean')
  std = _get(model, 'data_preprocessor.std')
  if mean and std:
    c.data.mean, c.data.std = tuple(mean), tuple(std)
  c.name = f'converted_{c.name}'
  return c
