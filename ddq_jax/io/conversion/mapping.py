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
            *rule.leaf.split('/'))
    return rule, path
  return None, ()


def convert_state_dict(
    state_dict: dict[str, np.ndarray],
) -> tuple[dict, dict[str, str], list[str]]:
  """Maps a torch state dict onto a nested {collection: {...}} tree.

  Returns:
    (variables, ignored {torch name: reason}, unmapped torch names).
  """
  variables: dict = {}
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
    node = variables
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = rule.layout(np.asarray(tensor, np.float32)
                                 if np.asarray(tensor).dtype != np.float32
                                 else np.asarray(tensor))
  return stack_layers(variables), ignored, unmapped


def torch_names_by_path(state_dict: dict[str, np.ndarray]) -> dict[tuple, str]:
  """Inverse view for error messages: our (stacked) path -> the torch name
  it came from (a stacked group's index written ``*``)."""
  out = {}
  for name, tensor in state_dict.items():
    rule, path = match_rule(name, np.ndim(tensor))
    if rule is not None and rule.collection is not None:
      stacked, index, group = _stacked_path(path)
      if index is not None:
        name = re.sub(rf'(^|\.){group}\.{index}(\.|$)', rf'\g<1>{group}.*\2',
                      name, count=1)
      out[stacked] = name
  return out


# Identical layers stored stacked: (the parent module's path, one pattern
# per key, and the torch ModuleList's name).  The per-layer keys
# ``{name}_{i}`` (and ``{name}_{i}_{j}``: entry j of a torch Sequential)
# become ``{name}`` (and ``{name}/{j}``) with a leading axis over i.
STACKED: tuple[tuple[tuple[str, ...], str], ...] = (
    (('encoder',), 'layers'),
    (('decoder',), 'layers'),
    (('bbox_head',), 'cls_branches'),
    (('bbox_head',), 'reg_branches'),
    (('bbox_head',), 'aux_cls_branches'),
    (('bbox_head',), 'aux_reg_branches'),
)
_SEQUENTIAL_INDEX = re.compile(r'^\d+(?:_\d+)*$')


def _group_at(path: tuple[str, ...]):
  """(the STACKED name, the position of its key in ``path``, the layer
  index or None when the key is the stacked one, the Sequential index
  joined to it) or (None,) * 4; ``path`` starts with the collection."""
  for parent, name in STACKED:
    n = len(parent)
    if len(path) <= n + 1 or not all(
        fnmatch.fnmatchcase(k, pat) for k, pat in zip(path[1:n + 1], parent)):
      continue
    key = path[n + 1]
    if key == name:
      return name, n + 1, None, None
    found = re.match(rf'^{name}_(\d+)(?:_(\d+(?:_\d+)*))?$', key)
    if found:
      return name, n + 1, int(found.group(1)), found.group(2)
  return None, None, None, None


def _stacked_path(path: tuple[str, ...]):
  """A per-layer path -> (its stacked path, the layer index or None, the
  group name)."""
  name, pos, index, seq = _group_at(path)
  if index is None:
    return path, None, None
  rest = (seq,) if seq else ()
  return path[:pos] + (name,) + rest + path[pos + 1:], index, name


def _flat(tree, prefix=()):
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    for k, v in tree.items():
      yield from _flat(v, prefix + (k,))
  else:
    yield prefix, tree


def _nest(flat: dict) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


def stack_layers(variables: dict) -> dict:
  """Per-layer variables (``encoder/layers_0``, ... as torch names them;
  checkpoints and converted weights written before layers were stacked)
  -> the model's stacked layout.  Idempotent: stacked trees pass unchanged.

  Args:
    variables: {collection: nested dicts of arrays}.

  Raises:
    ValueError: a group whose layers are not numbered 0..n-1, or one
      present both stacked and per layer.
  """
  flat, groups = {}, {}
  for path, leaf in _flat(variables):
    stacked, index, _ = _stacked_path(path)
    if index is None:
      flat[path] = leaf
    else:
      groups.setdefault(stacked, {})[index] = leaf
  for path, layers in groups.items():
    if path in flat:
      raise ValueError(f'{"/".join(path)}: both stacked and per layer')
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f'{"/".join(path)}: layers {sorted(layers)}, expected '
                       f'0..{len(layers) - 1}')
    flat[path] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
  return _with_collections(_nest(flat), variables)


def _with_collections(tree: dict, like: dict) -> dict:
  """``tree`` keeping ``like``'s collections, empty ones included."""
  for key in like:
    tree.setdefault(key, {})
  return tree


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
  for path, leaf in _flat(variables):
    name, pos, index, _ = _group_at(path)
    if name is None or index is not None:
      flat[path] = leaf
      continue
    tail = path[pos + 1:]
    seq = ()
    if tail and _SEQUENTIAL_INDEX.match(tail[0]):
      seq, tail = (tail[0],), tail[1:]
    for i in range(leaf.shape[0]):
      key = '_'.join((name, str(i)) + seq)
      flat[path[:pos] + (key,) + tail] = _layer_of(leaf, i)
  return _with_collections(_nest(flat), variables)
