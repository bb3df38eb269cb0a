"""TrainState pytree and its (sharded) creation.

    TrainState(step: int32[], params, batch_stats, opt_state, rng: uint32[2])

``batch_stats`` (frozen BatchNorm statistics) rides along unchanged: the
reference trains with ``norm_eval=True`` and BN ``requires_grad=False``.
``rng`` is a raw ``jax.random.PRNGKey`` (uint32) so it checkpoints as a
plain array; each step splits it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddq_jax.train.parallel import sharding as shd
from ddq_jax.tree_paths import flat_items, map_with_paths, path_str, split


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def create_train_state(variables: dict, tx, rng) -> TrainState:
  """variables: {'params': ..., 'batch_stats': ... (optional)}."""
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params), rng=jnp.asarray(rng, jnp.uint32))


def state_shardings(abstract_state: TrainState, mesh: Mesh, config=None, *,
                    min_size: int | None = None, rules=None) -> TrainState:
  """NamedShardings for every leaf under the partition rules of
  ``config.mesh`` (``min_size`` / ``rules`` override them; no config: the
  defaults).  Scalars and the rng are too small to shard: replicated."""
  config_rules, config_min = shd.rules_from_config(config)
  return shd.tree_shardings(
      abstract_state, mesh,
      min_size=config_min if min_size is None else min_size,
      rules=config_rules if rules is None else rules)


def init_train_state(init_variables: Callable[[jax.Array], dict], tx,
                     rng: jax.Array, mesh: Mesh, *,
                     min_size: int = shd.MIN_SHARD_SIZE,
                     rules=shd.DEFAULT_RULES
                     ) -> tuple[TrainState, TrainState]:
  """Initialises the state directly into its shardings (no host copy).

  Args:
    init_variables: rng -> {'params', 'batch_stats'} (e.g. a model's init).
    tx: the optax transformation.
    rng: a PRNGKey; split into (init key, state key).

  Returns:
    (state, shardings).
  """
  def make(key):
    k_init, k_state = jax.random.split(key)
    return create_train_state(init_variables(k_init), tx, k_state)

  abstract = jax.eval_shape(make, rng)
  shardings = state_shardings(abstract, mesh, min_size=min_size, rules=rules)
  state = jax.jit(make, out_shardings=shardings)(rng)
  return state, shardings


def merge_variables(state: TrainState, loaded: dict, tx, *,
                    strict_shapes: bool = True) -> tuple[TrainState, dict]:
  """Overwrites params / batch_stats leaves present in ``loaded`` (numpy
  {'params': ..., 'batch_stats': ...}, possibly a subtree such as the
  backbone only, given with its full path) and re-initialises the optimiser
  state.  Keeps each leaf's sharding.

  Returns (state, report) with report = {'loaded': n, 'missing': [paths],
  'unexpected': [paths]}.
  """
  report = {'loaded': 0, 'missing': [], 'unexpected': []}
  new = {}
  for coll in ('params', 'batch_stats'):
    cur = getattr(state, coll)
    src = dict(flat_items(loaded.get(coll, {})))
    used = set()

    def replace(path, x, coll=coll, src=src, used=used):
      key = split(path)
      if key not in src:
        report['missing'].append(path_str((coll,) + key))
        return x
      v = np.asarray(src[key])
      used.add(key)
      if v.shape != x.shape:
        if strict_shapes:
          raise ValueError(f'{path_str((coll,) + key)}: shape {v.shape} != '
                           f'{x.shape}')
        report['missing'].append(path_str((coll,) + key))
        return x
      report['loaded'] += 1
      v = v.astype(x.dtype)  # every process holds the full array
      return jax.make_array_from_callback(v.shape, x.sharding,
                                          lambda idx, v=v: v[idx])

    new[coll] = map_with_paths(replace, cur)
    report['unexpected'] += [path_str((coll,) + k) for k in src
                             if k not in used]
  opt_shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(new['params'])
  return state.replace(params=new['params'], batch_stats=new['batch_stats'],
                       opt_state=opt_state), report
