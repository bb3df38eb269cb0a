"""Declarative mapping of reference (torch) tensors onto our params tree.

Each row of ``RULES`` is (pattern, collection, leaf, layout): the first row
whose pattern matches a torch name (and whose ``ndim`` condition holds) sends
the tensor to ``collection/<module path>/<leaf>`` after applying ``layout``.
The module path comes from ``naming.flax_module_path`` on the regex group
``m``.  ``collection=None`` marks tensors we deliberately ignore.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

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
  return variables, ignored, unmapped


def torch_names_by_path(state_dict: dict[str, np.ndarray]) -> dict[tuple, str]:
  """Inverse view for error messages: our path -> the torch name it came from."""
  out = {}
  for name, tensor in state_dict.items():
    rule, path = match_rule(name, np.ndim(tensor))
    if rule is not None and rule.collection is not None:
      out[path] = name
  return out
