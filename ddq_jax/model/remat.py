"""Rematerialisation (activation checkpointing) policies, named in configs.

``config.train.remat`` holds one policy name per part of the model::

    c.train.remat.encoder = 'full'    # each deformable encoder layer
    c.train.remat.decoder = 'full'    # each decoder layer
    c.train.remat.backbone = 'full'   # each trainable ResNet / Swin block

Names (what the backward pass finds stored of a rematerialised layer):

* ``none``: everything autodiff keeps (no recomputation);
* ``minimal``: the outputs of matmuls without batch dimensions (the
  projections and FFN layers); attention maps, norms and elementwise work
  are recomputed (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``);
* ``full``: only the layer's inputs; the whole layer is recomputed once in
  the backward pass (``nothing_saveable``).

Remat changes memory and time, never values: the forward pass and its
gradients are the same functions (tests/test_remat.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax

REMAT_POLICIES = ('none', 'minimal', 'full')
REMAT_PARTS = ('encoder', 'decoder', 'backbone')


def checkpoint_policy(name: str) -> Optional[Callable]:
  """The jax.checkpoint policy of a policy name; None for 'none'."""
  if name == 'none':
    return None
  if name == 'minimal':
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name == 'full':
    return jax.checkpoint_policies.nothing_saveable
  raise ValueError(f'remat policy must be one of {REMAT_POLICIES}, got '
                   f'{name!r}')


def remat_name(config, part: str) -> str:
  """``config.train.remat.<part>``, validated."""
  if part not in REMAT_PARTS:
    raise ValueError(f'remat part must be one of {REMAT_PARTS}, got {part!r}')
  name = str(config.train.remat[part])
  checkpoint_policy(name)
  return name


def scan_layers(config) -> bool:
  """``config.train.scan_layers``: trace identical layers once (a scan over
  stacked per-layer parameters)."""
  return bool(config.train.scan_layers)


def stack_trees(trees):
  """Identically shaped trees -> one tree, leaves stacked on a new leading
  axis in list order."""
  return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


def stack_layer_params(params, names):
  """{name: tree} of identically shaped layers -> one tree, leaves stacked
  on a new leading axis in ``names`` order."""
  missing = [n for n in names if n not in params]
  if missing:
    raise KeyError(f'layer parameters {missing} not found; have '
                   f'{sorted(params)}')
  return stack_trees([params[n] for n in names])


def scan_layer_params(layer, carry, args, params, *, names,
                      policy=None, remat: bool = False, per_layer=(),
                      rngs=None):
  """Applies the unbound Flax ``layer`` once per entry of ``names``:
  ``carry = layer.apply({'params': params[name]}, carry, *args,
  *per_layer[l])``, as one ``lax.scan`` over the stacked parameters (the
  layer is traced once).

  Args:
    layer: an unbound module whose ``__call__(carry, *args, *per_layer)``
      returns the new carry (same shape and dtype).
    carry: the first argument (e.g. (B, N, C) queries).
    args: the other arguments, the same for every layer (arrays or None).
    params: a dict holding ``params[name]`` for every name.
    names: the layers' parameter names, in order.
    policy, remat: wrap each layer in ``jax.checkpoint(policy=policy)``.
    per_layer: arrays with a leading axis of len(names): layer l gets
      their slices [l] after ``args`` (e.g. per-layer drop-path rates).
    rngs: {collection: key} or None; layer l is applied with
      ``rngs={collection: split(key, len(names))[l]}``.
  """
  return scan_layer_variables(layer, carry, args, {'params': params},
                              names=names, policy=policy, remat=remat,
                              per_layer=per_layer, rngs=rngs)


def scan_layer_variables(layer, carry, args, variables, *, names,
                         policy=None, remat: bool = False, per_layer=(),
                         rngs=None):
  """``scan_layer_params`` over several collections: ``variables`` maps a
  collection ('params', 'batch_stats') to a dict holding every name; layer
  l is applied with ``{collection: variables[collection][names[l]]}``."""
  stacked = {col: stack_layer_params(tree, names)
             for col, tree in variables.items()}
  per_layer = tuple(per_layer)
  for a in per_layer:
    if a.shape[:1] != (len(names),):
      raise ValueError(f'per_layer arrays need a leading axis of '
                       f'{len(names)} (one per layer), got {a.shape}')
  layer_rngs = None if not rngs else {
      k: jax.random.split(v, len(names)) for k, v in rngs.items()}

  def one(v, c, xs, r):
    kw = {} if r is None else dict(rngs=r)
    return layer.apply(v, c, *args, *xs, **kw)
  if remat:
    one = jax.checkpoint(one, policy=policy, prevent_cse=False)

  # The carry takes the dtype the layer returns (float32 LayerNorms after
  # bfloat16 inputs), as in the unrolled loop after its first layer.
  first = jax.tree.map(lambda x: x[0], (stacked, per_layer, layer_rngs))
  out = jax.eval_shape(one, first[0], carry, first[1], first[2])
  carry = carry.astype(out.dtype)

  def body(c, v_xs_r):
    v, xs, r = v_xs_r
    return one(v, c, xs, r), None
  carry, _ = jax.lax.scan(body, carry, (stacked, per_layer, layer_rngs))
  return carry
