"""Swin backbone: its mmdet config fields, and the official checkpoints.

* ``swin_backbone_config``: an mmdet ``SwinTransformer`` backbone dict (from
  a checkpoint's ``meta['cfg']``) -> our ``config.backbone`` fields.
* ``official_to_mmdet``: the official Swin repository's key layout (the
  ImageNet classification checkpoints such as
  ``swin_large_patch4_window12_384_22k.pth``, which DDQ-DETR's Swin-L config
  loads) -> mmdet's names, exactly as mmdet's ``swin_converter``:
  ``layers.N`` -> ``stages.N``, ``attn.`` -> ``attn.w_msa.``,
  ``mlp.fc1/fc2`` -> ``ffn.layers.0.0/1``, ``patch_embed.proj`` ->
  ``patch_embed.projection``, ``head.*`` dropped, and the patch-merging
  ``reduction`` / ``norm`` re-ordered from the official 2x2 concatenation
  (x00, x10, x01, x11) to nn.Unfold's channel order.
  ``mmdet_to_official`` is its inverse.
* ``official_backbone_variables``: such a checkpoint -> our backbone
  variables for ``train.init_from``, checked against the model's shapes
  block by block, then stacked as the model stores them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.io.conversion.mapping import match_rule, stack_layers, unstack_layers
from ddq_jax.model.swin import SwinTransformer
from ddq_jax.tree_paths import flat_items, nest, path_str

_UNFOLD_ORDER = [0, 2, 1, 3]  # official (x00, x10, x01, x11) <-> unfold's


def swin_backbone_config(backbone: dict[str, Any], b) -> None:
  """Fills ``b`` (a ``config.backbone`` ConfigDict) from an mmdet
  ``SwinTransformer`` dict, with mmdet's defaults for absent fields.

  Raises:
    ValueError: a setting this port does not implement.
  """
  def get(key, default):
    value = backbone.get(key, default)
    return default if value is None else value

  act = backbone.get('act_cfg') or {'type': 'GELU'}
  norm = backbone.get('norm_cfg') or {'type': 'LN'}
  if act.get('type') != 'GELU' or norm.get('type') != 'LN':
    raise ValueError(f'SwinTransformer act_cfg {act} / norm_cfg {norm}: '
                     "only GELU and LN are supported")
  if get('use_abs_pos_embed', False):
    raise ValueError('SwinTransformer use_abs_pos_embed=True is not '
                     'supported')
  if int(get('in_channels', 3)) != 3:
    raise ValueError(f"SwinTransformer in_channels {backbone['in_channels']}:"
                     ' expected 3')
  b.type = 'swin'
  b.embed_dims = int(get('embed_dims', 96))
  b.depths = tuple(int(d) for d in get('depths', (2, 2, 6, 2)))
  b.num_heads = tuple(int(h) for h in get('num_heads', (3, 6, 12, 24)))
  b.window_size = int(get('window_size', 7))
  b.mlp_ratio = float(get('mlp_ratio', 4))
  b.patch_size = int(get('patch_size', 4))
  b.strides = tuple(int(s) for s in get('strides', (4, 2, 2, 2)))
  b.out_indices = tuple(int(i) for i in get('out_indices', (0, 1, 2, 3)))
  b.qkv_bias = bool(get('qkv_bias', True))
  b.qk_scale = float(get('qk_scale', 0.0))
  b.patch_norm = bool(get('patch_norm', True))
  b.drop_rate = float(get('drop_rate', 0.0))
  b.attn_drop_rate = float(get('attn_drop_rate', 0.0))
  b.drop_path_rate = float(get('drop_path_rate', 0.1))
  b.use_abs_pos_embed = False
  b.frozen_stages = int(get('frozen_stages', -1))
  size = get('pretrain_img_size', 224)
  b.pretrain_img_size = int(size[0] if isinstance(size, (tuple, list))
                            else size)
  b.with_cp = bool(get('with_cp', False))


# ------------------------------------------------- official key layout
def _reduction_to_unfold(x: np.ndarray) -> np.ndarray:
  out_channels, in_channels = x.shape
  x = x.reshape(out_channels, 4, in_channels // 4)[:, _UNFOLD_ORDER, :]
  return x.transpose(0, 2, 1).reshape(out_channels, in_channels)


def _norm_to_unfold(x: np.ndarray) -> np.ndarray:
  x = x.reshape(4, x.shape[0] // 4)[_UNFOLD_ORDER, :]
  return x.T.reshape(-1)


def _reduction_to_official(x: np.ndarray) -> np.ndarray:
  out_channels, in_channels = x.shape
  x = x.reshape(out_channels, in_channels // 4, 4).transpose(0, 2, 1)
  return x[:, _UNFOLD_ORDER, :].reshape(out_channels, in_channels)


def _norm_to_official(x: np.ndarray) -> np.ndarray:
  x = x.reshape(x.shape[0] // 4, 4).T
  return x[_UNFOLD_ORDER, :].reshape(-1)


def official_to_mmdet(state_dict: dict[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
  """mmdet's ``swin_converter``: official names -> ``backbone.*`` names."""
  out = {}
  for k, v in state_dict.items():
    new_v = v
    if k.startswith('head'):
      continue
    if k.startswith('layers'):
      if 'attn.' in k:
        new_k = k.replace('attn.', 'attn.w_msa.')
      elif 'mlp.' in k:
        if 'mlp.fc1.' in k:
          new_k = k.replace('mlp.fc1.', 'ffn.layers.0.0.')
        elif 'mlp.fc2.' in k:
          new_k = k.replace('mlp.fc2.', 'ffn.layers.1.')
        else:
          new_k = k.replace('mlp.', 'ffn.')
      elif 'downsample' in k:
        new_k = k
        if 'reduction.' in k:
          new_v = _reduction_to_unfold(np.asarray(v))
        elif 'norm.' in k:
          new_v = _norm_to_unfold(np.asarray(v))
      else:
        new_k = k
      new_k = new_k.replace('layers', 'stages', 1)
    elif k.startswith('patch_embed'):
      new_k = k.replace('proj', 'projection') if 'proj' in k else k
    else:
      new_k = k
    out['backbone.' + new_k] = new_v
  return out


def mmdet_to_official(state_dict: dict[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
  """The inverse of ``official_to_mmdet`` on an mmdet state dict's
  ``backbone.*`` tensors (the per-output ``norm{i}`` have no official
  counterpart and are dropped; the rest of the detector is ignored)."""
  out = {}
  for k, v in state_dict.items():
    if not k.startswith('backbone.'):
      continue
    k = k[len('backbone.'):]
    if k.startswith('stages'):
      k = k.replace('stages', 'layers', 1)
      if 'attn.w_msa.' in k:
        k = k.replace('attn.w_msa.', 'attn.')
      elif 'ffn.layers.0.0.' in k:
        k = k.replace('ffn.layers.0.0.', 'mlp.fc1.')
      elif 'ffn.layers.1.' in k:
        k = k.replace('ffn.layers.1.', 'mlp.fc2.')
      elif 'downsample.reduction.' in k:
        v = _reduction_to_official(np.asarray(v))
      elif 'downsample.norm.' in k:
        v = _norm_to_official(np.asarray(v))
    elif k.startswith('patch_embed'):
      k = k.replace('projection', 'proj')
    elif k.startswith('norm'):
      continue
    out[k] = v
  return out


def expected_backbone_shapes(config) -> dict[tuple, tuple]:
  """{path below params/backbone: shape} of the Swin backbone of ``config``
  (abstract: jax.eval_shape, no compute), one entry per block as torch
  names them (``mapping.unstack_layers``: the model stores the block pairs
  stacked)."""
  model = SwinTransformer.from_config(config)
  size = 2 * model.patch_size * model.window_size
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))
  per_block = unstack_layers({'params': {'backbone': shapes['params']}})
  return {path: tuple(leaf.shape)
          for path, leaf in flat_items(per_block['params']['backbone'])}


def official_backbone_variables(state_dict: dict[str, np.ndarray], config
                                ) -> tuple[dict, dict]:
  """An official Swin classification checkpoint -> ``{'params':
  {'backbone': ...}}`` for ``config``'s Swin backbone, its block pairs
  stacked as the model stores them (``mapping.stack_layers``).

  As the reference (``load_state_dict(strict=False)`` after
  ``swin_converter``): the classifier (``head.*``), the final ``norm`` and
  buffers (``attn_mask``, ``relative_position_index``) are not used, and the
  per-output norms (``norm{i}``) keep their initialisation.

  Returns:
    (variables, report) with report = {'loaded': n, 'unused': [names],
    'not_in_checkpoint': [paths]}.

  Raises:
    ValueError: a tensor whose shape differs from the model's (e.g. a
      checkpoint of another window size; the reference would resize the
      bias table bicubically, this port does not), naming each one.
  """
  state_dict = {k[len('module.'):] if k.startswith('module.') else k: v
                for k, v in state_dict.items()}
  want = expected_backbone_shapes(config)
  unused, misshaped, loaded = [], [], {}
  for name, tensor in official_to_mmdet(state_dict).items():
    rule, path = match_rule(name, np.ndim(tensor))
    sub = tuple(path[2:]) if (rule is not None and len(path) > 2
                              and path[:2] == ('params', 'backbone')) else None
    if sub is None or sub not in want:
      unused.append(name)
      continue
    value = rule.layout(np.asarray(tensor, np.float32))
    if tuple(value.shape) != want[sub]:
      misshaped.append(f'{name} -> {path_str(sub)}: {tuple(value.shape)} vs '
                       f'{want[sub]}')
      continue
    loaded[sub] = value
  if misshaped:
    raise ValueError('the Swin checkpoint does not fit the backbone of '
                     f'config {config.name!r}:\n  ' + '\n  '.join(misshaped))
  missing = sorted(path_str(p) for p in want if p not in loaded)
  return (stack_layers({'params': {'backbone': nest(loaded)}}),
          {'loaded': len(loaded), 'unused': sorted(unused),
           'not_in_checkpoint': missing})
