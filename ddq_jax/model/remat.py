"""Rematerialisation (activation checkpointing) policies, named in configs,
and identical layers stored stacked and run as one scan.

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

Stacked layers: ``stacked_params`` creates the parameters of ``num``
identical layers as one tree whose leaves have a leading layer axis (the
layout the checkpoint holds), and ``scan_stacked`` applies the layer once
per entry with ``lax.scan`` (``train.scan_layers``: a loop, or the same
scan unrolled), each layer wrapped in ``jax.checkpoint`` by the remat
policy.  The torch names of the single layers live at the conversion
boundary (io/conversion/mapping.py).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
from flax.core.scope import LazyRng
import jax
import jax.numpy as jnp

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
  """``config.train.scan_layers``: stacked layers run as one ``lax.scan``
  loop (traced and compiled once); False unrolls the same scan
  (straight-line code, one copy per layer)."""
  return bool(config.train.scan_layers)


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _zeros(shapes):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _submodule_rng(module: nn.Module, name: str, rng):
  """The 'params' rng a submodule named ``name`` of ``module`` gets: flax
  folds each scope's name into the root key (``flax.core.scope.LazyRng``),
  so a layer initialised with it draws what it would draw as that
  submodule, however its parameters are stored.  ``rng`` (the ``param``
  init's own) where the scope has no 'params' rng: flax then only checks
  the init's shapes."""
  base = module.scope.rngs.get('params')
  return rng if base is None else LazyRng.create(base, name)


def module_params(module: nn.Module, name: str, layer: nn.Module,
                  *example) -> Any:
  """``module.param(name)`` holding the parameters of the unbound ``layer``
  (its own init on zeros shaped like ``example``): the layer is then applied
  as a pure function, ``layer.apply({'params': p}, ...)``, e.g. inside a
  scan body, and its parameters sit at ``module/name`` as if it were a
  submodule, drawn as that submodule would draw them."""
  shapes = _abstract(example)
  return module.param(name, lambda rng: layer.init(
      {'params': _submodule_rng(module, name, rng)},
      *_zeros(shapes))['params'])


def _stacked_init(module, layer, names, shapes, rng) -> dict:
  """Every collection of ``layer``'s init once per name, stacked; layer l
  draws as a submodule ``names[l]`` of ``module`` would."""
  per_layer = [layer.init({'params': _submodule_rng(module, n, rng)},
                          *_zeros(shapes)) for n in names]
  return jax.tree.map(lambda *a: jnp.stack(a), *per_layer)


def stacked_params(module: nn.Module, name: str, layer: nn.Module, num: int,
                   *example, layer_names: Optional[list[str]] = None) -> Any:
  """``module.param(name)`` holding ``num`` inits of the unbound ``layer``
  (on zeros shaped like ``example``), every leaf stacked on a new leading
  axis of ``num``: the parameters of identical layers in the shape the scan
  reads them (``scan_stacked``).  Layer l draws its random init as a
  submodule ``layer_names[l]`` of ``module`` (default ``{name}_{l}``, the
  unstacked layer's name) would: the values do not depend on the stacking,
  and a model initialised before layers were stored stacked gets the same
  weights from the same key."""
  shapes = _abstract(example)
  names = layer_names or [f'{name}_{l}' for l in range(num)]
  return module.param(name, lambda rng: _stacked_init(
      module, layer, names, shapes, rng)['params'])


def stacked_variables(module: nn.Module, name: str, layer: nn.Module,
                      num: int, *example,
                      layer_names: Optional[list[str]] = None) -> dict:
  """``stacked_params`` for a layer with more collections than 'params'
  (e.g. BatchNorm statistics): {collection: stacked tree}, each stored at
  ``module/name`` of its collection."""
  shapes = _abstract(example)
  names = layer_names or [f'{name}_{l}' for l in range(num)]
  collections = jax.eval_shape(
      lambda: layer.init(jax.random.key(0), *_zeros(shapes))).keys()
  out = {'params': module.param(name, lambda rng: _stacked_init(
      module, layer, names, shapes, rng)['params'])}
  for col in sorted(set(collections) - {'params'}):
    out[col] = module.variable(col, name, lambda c=col: jax.tree.map(
        lambda a: jnp.broadcast_to(a, (num,) + a.shape),
        layer.init(jax.random.key(0), *_zeros(shapes))[c])).value
  return out


def num_stacked(tree) -> int:
  """The leading axis (the number of layers) of stacked parameters."""
  return int(jax.tree.leaves(tree)[0].shape[0])


def scan_stacked(layer, carry, args, variables, *, policy=None,
                 remat: bool = False, unroll: bool = False, per_layer=(),
                 rngs=None):
  """Applies the unbound Flax ``layer`` once per layer of the stacked
  ``variables`` ({collection: tree with a leading layer axis}), as one
  ``lax.scan``: ``carry = layer.apply(variables[l], carry, *args,
  *per_layer[l])``.

  Args:
    layer: an unbound module whose ``__call__(carry, *args, *per_layer)``
      returns the new carry (same shape).
    carry: the first argument (e.g. (B, N, C) queries).
    args: the other arguments, the same for every layer (arrays or None).
    variables: {'params': stacked, ...} (``stacked_params``).
    policy, remat: wrap each layer in ``jax.checkpoint(policy=policy)``.
    unroll: unroll the scan (straight-line code; the same values).
    per_layer: arrays with a leading axis of one entry per layer: layer l
      gets their slices [l] after ``args`` (e.g. drop-path rates).
    rngs: {collection: key} or None; layer l is applied with
      ``rngs={collection: split(key, num_layers)[l]}``.
  """
  num = num_stacked(variables)
  per_layer = tuple(per_layer)
  for a in per_layer:
    if a.shape[:1] != (num,):
      raise ValueError(f'per_layer arrays need a leading axis of {num} (one '
                       f'per layer), got {a.shape}')
  layer_rngs = None if not rngs else {
      k: jax.random.split(v, num) for k, v in rngs.items()}

  def one(v, c, xs, r):
    kw = {} if r is None else dict(rngs=r)
    return layer.apply(v, c, *args, *xs, **kw)
  if remat:
    one = jax.checkpoint(one, policy=policy, prevent_cse=False)

  # The carry takes the dtype the layer returns (float32 LayerNorms after
  # bfloat16 inputs), as the carry of every later layer.
  first = jax.tree.map(lambda x: x[0], (variables, per_layer, layer_rngs))
  out = jax.eval_shape(one, first[0], carry, first[1], first[2])
  carry = carry.astype(out.dtype)

  def body(c, v_xs_r):
    v, xs, r = v_xs_r
    return one(v, c, xs, r), None
  carry, _ = jax.lax.scan(body, carry, (variables, per_layer, layer_rngs),
                          unroll=True if unroll else 1)
  return carry

