"""Our variables back to the reference's names and layouts.

The inverse of ``mapping.convert_state_dict``: the stacked layers are
unstacked (``mapping.unstack_layers``), then for each reference tensor
name the same rule of ``mapping.RULES`` that imported it finds our leaf,
and the inverse of its layout puts it back in torch's layout (Dense kernel
(in, out) -> Linear weight (out, in); HWIO -> OIHW).

    sd = to_reference_names(variables, {'query_map.weight': 2, ...})
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from ddq_jax.io.conversion import mapping
from ddq_jax.tree_paths import path_str


def _inverse_layout(rule: mapping.Rule):
  if rule.layout is mapping._linear:  # pylint: disable=protected-access
    return lambda x: np.ascontiguousarray(np.asarray(x).T)
  if rule.layout is mapping._conv:  # pylint: disable=protected-access
    return lambda x: np.ascontiguousarray(np.transpose(np.asarray(x),
                                                       (3, 2, 0, 1)))
  if rule.layout is mapping._same:  # pylint: disable=protected-access
    return np.asarray
  raise ValueError(f'rule {rule.pattern!r}: no inverse for its layout '
                   f'{rule.layout!r}')


def reference_path(name: str, ndim: int) -> tuple[Optional[mapping.Rule],
                                                  tuple[str, ...]]:
  """The rule and our full path (collection first) of a reference tensor;
  (rule, ()) for deliberately ignored names, (None, ()) for unknown ones."""
  return mapping.match_rule(name, ndim)


def to_reference_names(variables: Mapping, names: Mapping[str, int], *,
                       collections: tuple[str, ...] = ('params',
                                                       'batch_stats'),
                       ) -> dict[str, np.ndarray]:
  """{reference name: array in the reference's layout}.

  Args:
    variables: our {'params': ..., 'batch_stats': ...} (nested dicts of
      arrays), or a subset of those collections.
    names: {reference tensor name: its ndim}, e.g. from a state dict
      ``{k: v.ndim for k, v in sd.items()}``.
    collections: only names that map into these collections are exported
      (('params',) gives the trainable parameters only).

  Returns:
    One entry per name that maps into ``collections``; ignored names (e.g.
    ``num_batches_tracked``) are skipped.

  Raises:
    KeyError: a name maps to a path that ``variables`` does not hold (the
      message names both).
  """
  out = {}
  variables = mapping.unstack_layers(
      {k: v for k, v in variables.items() if k in collections})
  for name, ndim in names.items():
    rule, path = reference_path(name, int(ndim))
    if rule is None:
      raise KeyError(f'{name!r}: no conversion rule matches this reference '
                     'name')
    if not path or path[0] not in collections:
      continue
    node = variables
    for key in path:
      if not isinstance(node, Mapping) or key not in node:
        raise KeyError(f'{name!r}: our variables have no {path_str(path)}')
      node = node[key]
    out[name] = _inverse_layout(rule)(node)
  return out
