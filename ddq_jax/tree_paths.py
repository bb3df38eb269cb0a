"""The one spelling of a parameter's path: 'backbone/layer1_0/conv1/kernel'.

Dict keys, attribute names and sequence indices joined with '/'.  Every
reader of a leaf's name uses it: the lr groups and frozen parameters
(``model/param_groups.py``'s regexes), the partition rules
(``train/parallel/sharding.py``), the optimiser's labels, the flat
optimiser's layout, the checkpoints' per-leaf checksums and array specs,
the weight-fit and conversion reports.

    path_str(key_path)              # a jax key path (or str parts) -> 'a/b/0/c'
    leaf_paths(tree)                # path_str of every leaf, in leaf order
    map_with_paths(fn, tree)        # fn('a/b/c', leaf) over every leaf
    flat_items(nested)              # ((parts...), leaf) of nested mappings
    nest({(parts...): leaf})        # back to nested dicts

The reference's torch names ('encoder.layers.0.ffn...') are another
spelling, made and read in one place only: ``io/conversion/naming.py``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import jax

SEP = '/'


def _part(key) -> str:
  """One key path entry (DictKey .key, GetAttrKey .name, SequenceKey .idx,
  FlattenedIndexKey .key) or a plain name, as text."""
  return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx',
                                                              key))))


def path_str(path) -> str:
  """A key path (``jax.tree_util.tree_flatten_with_path``) or a sequence of
  names as 'a/b/0/c'."""
  return SEP.join(_part(k) for k in path)


def split(path: str) -> tuple[str, ...]:
  """'a/b/c' -> ('a', 'b', 'c') (inverse of ``path_str`` on names)."""
  return tuple(path.split(SEP))


def leaf_paths(tree: Any, *,
               is_leaf: Optional[Callable[[Any], bool]] = None) -> list[str]:
  """``path_str`` of every leaf of ``tree``, in leaf order."""
  paths, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [path_str(p) for p, _ in paths]


def map_with_paths(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``jax.tree_util.tree_map_with_path`` with the path as 'a/b/c':
  ``fn(path, leaf, *other_leaves)``."""
  return jax.tree_util.tree_map_with_path(
      lambda p, *x: fn(path_str(p), *x), tree, *rest)


def flat_items(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """(path parts, leaf) of every leaf of nested mappings (dicts,
  FrozenDicts), depth first in each mapping's order; an empty mapping
  yields nothing."""
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from flat_items(v, prefix + (k,))
  else:
    yield prefix, tree


def nest(flat: Mapping[tuple, Any]) -> dict:
  """{(parts...): leaf} -> nested dicts (inverse of ``flat_items``)."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out
