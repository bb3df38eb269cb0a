"""Declarative mapping of reference (torch) tensors onto our params tree.

Each row of ``RULES`` is (pattern, collection, leaf, layout): the first row
whose pattern matches a torch name (and whose ``ndim`` condition holds) sends
the tensor to ``collection/<module path>/<leaf>`` after applying ``layout``.
The module path comes from ``naming.flax_module_path`` on the regex group
``m``.  ``collection=None`` marks tensors we deliberately ignore.

That path is the *per-layer* one, which mirrors torch's module tree
(``encoder/layers_3/...``).  Our model stores identical layers stacked
(``STACKED``): ``encoder/layers/...`` with a leading layer axis, entry 3
being torch's ``encoder.layers.3``.  ``convert_state_dict`` returns the
stacked layout; ``stack_layers`` / ``unstack_layers`` convert between the
two (export, the parity tooling, and old files written per layer, which
``stack_layers`` converts once at load).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Callable, Optional

import jax
import numpy as np

from ddq_jax.io.conversion.naming import flax_module_path
from ddq_jax.tree_paths import flat_items, nest, path_str, split


def _same(x):
  return x


def _linear(x):  # torch Linear (out, in) -> Flax Dense kernel (in, out)
  return np.ascontiguousarray(x.T)


def _conv(x):  # torch OIHW -> Flax HWIO
  return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))


@dataclasses.dataclass(frozen=True)
class Rule:
  pattern: str
  collection: Optional[str]   # None: deliberately ignored
  leaf: str = ''
  layout: Callable[[np.ndarray], np.ndarray] = _same
  ndim: Optional[int] = None  # only tensors of this rank
  why: str = ''               # for ignored tensors: the reason


RULES: tuple[Rule, ...] = (
    Rule(r'^(?P<m>.*)\.num_batches_tracked$', None,
         why='BatchNorm step counter; unused with frozen statistics'),
    # Swin window attention: the index is a constant the model rebuilds.
    Rule(r'^(?P<m>.*)\.relative_position_index$', None,
         why='Swin relative position index; a constant of the window size'),
    Rule(r'^(?P<m>.*)\.relative_position_bias_table$', 'params',
         'relative_position_bias_table'),
    Rule(r'^(?P<m>.*)\.running_mean$', 'batch_stats', 'mean'),
    Rule(r'^(?P<m>.*)\.running_var$', 'batch_stats', 'var'),
    # nn.MultiheadAttention packs q/k/v as one (3C, C) projection.
    Rule(r'^(?P<m>.*\.attn)\.in_proj_weight$', 'params', 'in_proj/kernel',
         _linear),
    Rule(r'^(?P<m>.*\.attn)\.in_proj_bias$', 'params', 'in_proj/bias'),
    Rule(r'^(?P<m>.*label_embedding)\.weight$', 'params', 'embedding'),
    Rule(r'^(?P<m>)level_embed$', 'params', 'level_embed'),
    Rule(r'^(?P<m>.*)\.weight$', 'params', 'kernel', _conv, ndim=4),
    Rule(r'^(?P<m>.*)\.weight$', 'params', 'kernel', _linear, ndim=2),
    Rule(r'^(?P<m>.*)\.weight$', 'params', 'scale', ndim=1),  # norms
    Rule(r'^(?P<m>.*)\.bias$', 'params', 'bias'),
)


def match_rule(name: str, ndim: int) -> tuple[Optional[Rule], tuple[str, ...]]:
  """The rule for a torch tensor and its full target path (collection first)."""
  for rule in RULES:
    if rule.ndim is not None and rule.ndim != ndim:
      continue
    found = re.match(rule.pattern, name)
    if not found:
      continue
    if rule.collection is None:
      return rule, ()
    path = (rule.collection, *flax_module_path(found.group('m')),
            *split(rule.leaf))
    return rule, path
  return None, ()


def convert_state_dict(
    state_dict: dict[str, np.ndarray],
) -> tuple[dict, dict[str, str], list[str]]:
  """Maps a torch state dict onto a nested {collection: {...}} tree.

  Returns:
    (variables, ignored {torch name: reason}, unmapped torch names).
  """
  flat: dict = {}
  ignored: dict[str, str] = {}
  unmapped: list[str] = []
  for name, tensor in state_dict.items():
    rule, path = match_rule(name, np.ndim(tensor))
    if rule is None:
      unmapped.append(name)
      continue
    if rule.collection is None:
      ignored[name] = rule.why
      continue
    flat[path] = rule.layout(np.asarray(tensor, np.float32)
                             if np.asarray(tensor).dtype != np.float32
                             else np.asarray(tensor))
  return stack_layers(nest(flat)), ignored, unmapped


def torch_names_by_path(state_dict: dict[str, np.ndarray]) -> dict[tuple, str]:
  """Inverse view for error messages: our (stacked) path -> the torch name
  it came from (a stacked group's index written ``*``)."""
  paths = {}
  for name, tensor in state_dict.items():
    rule, path = match_rule(name, np.ndim(tensor))
    if rule is not None and rule.collection is not None:
      paths[name] = path
  ends = _stack_ends(paths.values())
  out = {}
  for name, path in paths.items():
    stacked, entry, index, group = _stacked_path(path, ends)
    if entry is not None:
      name = re.sub(rf'(^|\.){group.name}\.{index}(\.|$)',
                    rf'\g<1>{group.name}.*\2', name, count=1)
    out[stacked] = name
  return out


@dataclasses.dataclass(frozen=True)
class Stacked:
  """A group of identical layers stored stacked.

  The per-layer keys ``{name}_{i}`` (and ``{name}_{i}_{j}``: entry j of a
  torch Sequential) under ``parent`` become ``{key}`` (and ``{key}/{j}``)
  with a leading axis over i - first; layers before ``first`` stay per
  layer (a ResNet stage's first block, which differs).

  ``slots``: the layers alternate between these kinds (a Swin stage's
  regular and shifted blocks), stored as ``{key}/{slot}`` each with a
  leading axis over the groups of ``len(slots)``: layer first + k * n + s
  is entry k of slot s.  Layers past the last whole group stay per layer
  (an odd last Swin block).
  """
  parent: tuple[str, ...]   # the parent module's path, a pattern per key
  name: str                 # the torch ModuleList's name
  first: int = 0
  key: str = ''             # the stacked key (default: name)
  slots: tuple[str, ...] = ()

  @property
  def stacked_key(self) -> str:
    return self.key or self.name

  @property
  def group_size(self) -> int:
    return max(1, len(self.slots))


STACKED: tuple[Stacked, ...] = (
    Stacked(('encoder',), 'layers'),
    Stacked(('decoder',), 'layers'),
    Stacked(('bbox_head',), 'cls_branches'),
    Stacked(('bbox_head',), 'reg_branches'),
    Stacked(('bbox_head',), 'aux_cls_branches'),
    Stacked(('bbox_head',), 'aux_reg_branches'),
    Stacked(('backbone', 'stages_*'), 'blocks', key='pairs',
            slots=('regular', 'shifted')),
) + tuple(Stacked(('backbone',), f'layer{i}', first=1, key=f'layer{i}_tail')
          for i in range(1, 5))
_SEQUENTIAL_INDEX = re.compile(r'^\d+(?:_\d+)*$')


def _group_at(path: tuple[str, ...]):
  """(the Stacked group, the position of its key in ``path``, the torch
  layer index or None when the key is the stacked one, the Sequential index
  joined to it) or (None,) * 4; ``path`` starts with the collection."""
  for group in STACKED:
    n = len(group.parent)
    if len(path) <= n + 1 or not all(
        fnmatch.fnmatchcase(k, pat)
        for k, pat in zip(path[1:n + 1], group.parent)):
      continue
    key = path[n + 1]
    if key == group.stacked_key:
      return group, n + 1, None, None
    found = re.match(rf'^{group.name}_(\d+)(?:_(\d+(?:_\d+)*))?$', key)
    if found and int(found.group(1)) >= group.first:
      return group, n + 1, int(found.group(1)), found.group(2)
  return None, None, None, None


def _stack_ends(paths) -> dict:
  """{(group, parent path without the collection): the first torch layer
  index past the last whole group} of the slotted groups among the
  per-layer ``paths``."""
  last = {}
  for path in paths:
    group, pos, index, _ = _group_at(path)
    if index is not None and group.slots:
      key = (group, path[1:pos])
      last[key] = max(last.get(key, -1), index)
  out = {}
  for (group, parent), end in last.items():
    whole = (end + 1 - group.first) // group.group_size
    out[group, parent] = group.first + whole * group.group_size
  return out


def _stacked_path(path: tuple[str, ...], ends: dict):
  """A per-layer path -> (its stacked path, its entry on the stacked axis
  or None when it stays per layer, the torch layer index, the group);
  ``ends``: ``_stack_ends`` of all paths."""
  group, pos, index, seq = _group_at(path)
  if index is None or (group.slots and
                       index >= ends[(group, path[1:pos])]):
    return path, None, None, None
  rest = (seq,) if seq else ()
  entry, slot = divmod(index - group.first, group.group_size)
  key = (group.stacked_key,) + ((group.slots[slot],) if group.slots else ())
  return path[:pos] + key + rest + path[pos + 1:], entry, index, group


def stack_layers(variables: dict) -> dict:
  """Per-layer variables (``encoder/layers_0``, ... as torch names them;
  checkpoints and converted weights written before layers were stacked)
  -> the model's stacked layout.  Idempotent: stacked trees pass unchanged.

  Args:
    variables: {collection: nested dicts of arrays}.

  A group whose layers are not numbered first..n-1 (a tensor missing) is
  left per layer, for the fit check to name what is missing.

  Raises:
    ValueError: a group present both stacked and per layer.
  """
  leaves = dict(flat_items(variables))
  ends = _stack_ends(leaves)
  flat, groups = {}, {}
  for path, leaf in leaves.items():
    stacked, entry, _, group = _stacked_path(path, ends)
    if entry is None:
      flat[path] = leaf
    else:
      groups.setdefault(stacked, (group, {}))[1][entry] = (path, leaf)
  for path, (group, layers) in groups.items():
    if path in flat:
      raise ValueError(f'{path_str(path)}: both stacked and per layer')
    if sorted(layers) != list(range(len(layers))):  # a tensor missing: left
      flat.update(layers.values())                 # for the fit check
      continue
    flat[path] = np.stack([np.asarray(layers[i][1])
                           for i in range(len(layers))])
  return _with_collections(nest(flat), variables)


def _with_collections(tree: dict, like: dict) -> dict:
  """``tree`` keeping ``like``'s collections, empty ones included."""
  for key in like:
    tree.setdefault(key, {})
  return tree


def _per_layer_path(stacked: tuple[str, ...], group: Stacked, entry: int):
  """A stacked path's entry back to its torch layer's path."""
  pos = stacked.index(group.stacked_key, 1 + len(group.parent))
  tail = stacked[pos + 1:]
  index = group.first + entry * group.group_size
  if group.slots:
    index += group.slots.index(tail[0])
    tail = tail[1:]
  seq = ()
  if tail and _SEQUENTIAL_INDEX.match(tail[0]):
    seq, tail = (tail[0],), tail[1:]
  return stacked[:pos] + ('_'.join((group.name, str(index)) + seq),) + tail


def _layer_of(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[i]


def unstack_layers(variables: dict) -> dict:
  """The model's stacked variables -> one entry per layer, named as torch
  names them (``encoder/layers_0``, ``bbox_head/reg_branches_3_0``): the
  layout ``match_rule``'s paths address.  Leaves may be arrays or
  ``jax.ShapeDtypeStruct``."""
  flat = {}
  for path, leaf in flat_items(variables):
    group, pos, index, _ = _group_at(path)
    if group is None or index is not None:
      flat[path] = leaf
      continue
    for i in range(leaf.shape[0]):
      flat[_per_layer_path(path, group, i)] = _layer_of(leaf, i)
  return _with_collections(nest(flat), variables)
