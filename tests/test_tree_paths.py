"""The one spelling of a leaf's path (ddq_jax/tree_paths.py)."""
import flax
import jax
import numpy as np

from ddq_jax import tree_paths


def test_path_str_of_every_key_kind():
  tree = {'a': [np.zeros(2), {'b': np.ones(1)}],
          'c': flax.struct.dataclass(type('S', (), {'__annotations__': {
              'x': object}}))(x=np.zeros(3))}
  assert tree_paths.leaf_paths(tree) == ['a/0', 'a/1/b', 'c/x']
  assert tree_paths.path_str(('params', 'backbone', 'kernel')) == (
      'params/backbone/kernel')
  assert tree_paths.split('a/1/b') == ('a', '1', 'b')


def test_map_with_paths():
  tree = {'x': {'kernel': 1, 'bias': 2}}
  assert tree_paths.map_with_paths(lambda p, v: f'{p}={v}', tree) == {
      'x': {'kernel': 'x/kernel=1', 'bias': 'x/bias=2'}}


def test_flat_items_and_nest_invert():
  tree = {'params': {'a': {'b': 1, 'c': 2}, 'd': 3}, 'empty': {}}
  flat = dict(tree_paths.flat_items(tree))
  assert flat == {('params', 'a', 'b'): 1, ('params', 'a', 'c'): 2,
                  ('params', 'd'): 3}
  assert tree_paths.nest(flat) == {'params': tree['params']}
  frozen = flax.core.freeze(tree)
  assert dict(tree_paths.flat_items(frozen)) == flat
  # the same names as jax's key paths (which sort dict keys)
  assert tree_paths.leaf_paths(tree) == [
      tree_paths.path_str(p) for p in sorted(flat)]
  assert jax.tree.leaves(tree) == [1, 2, 3]
