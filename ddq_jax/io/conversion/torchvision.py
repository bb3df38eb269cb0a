"""ImageNet-pretrained torchvision ResNet weights -> our backbone variables.

torchvision's ResNet names (conv1.weight, bn1.*, layerX.Y.{conv,bn}Z.*,
layerX.Y.downsample.{0,1}.*) are exactly mmdet's backbone names without the
``backbone.`` prefix, so the project's declarative table converts them; the
classifier (``fc.*``) is dropped.  The result is checked tensor by tensor
against the shapes our ``ResNet`` expects.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.io.conversion.mapping import convert_state_dict, unstack_layers
from ddq_jax.model.resnet import ResNet
from ddq_jax.tree_paths import flat_items, path_str

_PREFIX = 'backbone.'
_IGNORED_PREFIXES = ('fc.',)          # ImageNet classifier
_STRIP_PREFIXES = ('module.', 'backbone.')  # DataParallel / mmdet-style dumps


def expected_backbone_shapes(*, depth: int = 50, base_channels: int = 64
                             ) -> dict[tuple, tuple]:
  """{(collection, *path): shape} of ResNet(depth, base_channels)'s variables,
  per block as torch names them
  (from ``jax.eval_shape`` of its init; nothing is allocated)."""
  model = ResNet(depth=depth, base_channels=base_channels,
                 out_indices=(0, 1, 2, 3), frozen_stages=-1)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0),
                         jnp.zeros((1, 64, 64, 3), jnp.float32)))
  # Per block, as torchvision names them (the model stores blocks stacked).
  shapes = unstack_layers({col: {'backbone': tree}
                           for col, tree in shapes.items()})
  shapes = {col: tree['backbone'] for col, tree in shapes.items()}
  return {key: tuple(s.shape) for key, s in flat_items(shapes)}


def torchvision_resnet_to_variables(state_dict: dict[str, np.ndarray], *,
                                    depth: int = 50, base_channels: int = 64
                                    ) -> dict[str, dict]:
  """torchvision ResNet state dict -> {'params': ..., 'batch_stats': ...}.

  Args:
    state_dict: {torch name: array} as torchvision saves it (``fc.*`` and
      ``num_batches_tracked`` are ignored; a ``module.`` or ``backbone.``
      prefix is tolerated).
    depth, base_channels: the backbone that will receive the weights.
  Returns:
    The backbone subtree: conv kernels HWIO, BN scale/bias in ``params``,
    running statistics as ``batch_stats`` mean/var (numpy float32 leaves).
  Raises:
    ValueError: listing every missing, unexpected or mis-shaped tensor.
  """
  renamed = {}
  for name, tensor in state_dict.items():
    for p in _STRIP_PREFIXES:
      if name.startswith(p):
        name = name[len(p):]
    if name.startswith(_IGNORED_PREFIXES):
      continue
    renamed[_PREFIX + name] = np.asarray(tensor)
  variables, _, unmapped = convert_state_dict(renamed)
  per_block = unstack_layers(variables)
  got = {}
  for col in ('params', 'batch_stats'):
    sub = per_block.get(col, {}).get('backbone', {})
    for key, arr in flat_items(sub):
      got[(col,) + key] = arr
  expected = expected_backbone_shapes(depth=depth, base_channels=base_channels)
  missing = sorted(k for k in expected if k not in got)
  unexpected = sorted(k for k in got if k not in expected)
  wrong = sorted(k for k in expected if k in got
                 and tuple(got[k].shape) != expected[k])
  unexpected_top = sorted(k for col, tree in variables.items()
                          for k in tree if k != 'backbone')
  if missing or unexpected or wrong or unmapped or unexpected_top:
    lines = [f'torchvision ResNet-{depth} (base_channels={base_channels}) '
             'weights do not fit the backbone:']
    if missing:
      lines.append(f'  missing ({len(missing)}): ' + ', '.join(
          path_str(k) + str(expected[k]) for k in missing[:20]))
    if unexpected:
      lines.append(f'  unexpected ({len(unexpected)}): ' + ', '.join(
          path_str(k) for k in unexpected[:20]))
    if wrong:
      lines.append(f'  wrong shape ({len(wrong)}): ' + ', '.join(
          f'{path_str(k)} got {tuple(got[k].shape)} expected {expected[k]}'
          for k in wrong[:20]))
    if unmapped or unexpected_top:
      lines.append('  unrecognised tensors: ' + ', '.join(
          [n[len(_PREFIX):] for n in unmapped] + unexpected_top)[:2000])
    raise ValueError('\n'.join(lines))
  return {'params': variables.get('params', {}).get('backbone', {}),
          'batch_stats': variables.get('batch_stats', {}).get('backbone', {})}
