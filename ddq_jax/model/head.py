"""DDQ-DETR's detection head: the class / box branches and their forward.

Reference: mmdet 3.3.0 ``dense_heads/ddq_detr_head.py`` (over DINOHead /
DeformableDETRHead, ``as_two_stage=True``, ``with_box_refine=True``).

Branches (L = decoder layers), named as the torch ModuleLists:
  cls_branches_{i}        i in 0..L+1: Linear(C, num_classes)
  reg_branches_{i}_{0,2,4} i in 0..L+1: Linear-ReLU-Linear-ReLU-Linear(C, 4)
    (0..L-1: decoder layers; L: the encoder proposals; L+1: the dense
    encoder proposals)
  aux_cls_branches_{i}, aux_reg_branches_{i}_{0,2,4}  i in 0..L-1: the dense
    queries of every decoder layer.

Init (``DeformableDETRHead._init_layers`` + ``DDQDETRHead.init_weights``):
every branch is a deepcopy of one torch-default Linear / reg MLP, so all
branches start identical (one fixed key per layer kind, drawn from the
head's 'params' rng); class biases bias_init_with_prob(0.01) = -log(99);
each reg branch's last Linear weight 0 and bias 0.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax.model import initializers as inits
from ddq_jax.model.remat import stack_trees
from ddq_jax.ops.boxes import inverse_sigmoid

HEAD_INV_SIGMOID_EPS = 1e-5
CLS_PRIOR_PROB = 0.01


def _fold_in(key, i: int):
  """fold_in, or None outside init (no dead random ops in the traced
  program, which exporters would have to carry)."""
  return None if key is None else jax.random.fold_in(key, i)


def _with_key(init, key):
  """``init`` drawing from the fixed ``key`` (None outside init: flax only
  checks shapes there)."""
  return init if key is None else inits.with_fixed_key(init, key)


def _torch_linear(features: int, fan_in: int, key: jax.Array, **kwargs):
  """torch-default Linear whose weight and bias come from ``key`` (the
  reference's deepcopies of one Linear)."""
  kw, kb = (None, None) if key is None else jax.random.split(key)
  return nn.Dense(features,
                  kernel_init=_with_key(inits.torch_linear_kernel, kw),
                  bias_init=_with_key(inits.torch_linear_bias(fan_in), kb),
                  **kwargs)


def _cls_branch(num_classes: int, embed_dims: int, key: jax.Array):
  kw = _fold_in(key, 0)
  return nn.Dense(num_classes,
                  kernel_init=_with_key(inits.torch_linear_kernel, kw),
                  bias_init=inits.constant(
                      inits.bias_init_with_prob(CLS_PRIOR_PROB)))


def _reg_branch(embed_dims: int, key: jax.Array):
  return {'0': _torch_linear(embed_dims, embed_dims, _fold_in(key, 1)),
          '2': _torch_linear(embed_dims, embed_dims, _fold_in(key, 2)),
          '4': nn.Dense(4, kernel_init=inits.zeros, bias_init=inits.zeros)}


def _apply_reg(branch, x):
  x = jax.nn.relu(branch['0'](x))
  x = jax.nn.relu(branch['2'](x))
  return branch['4'](x)


REG_LAYERS = ('0', '2', '4')


def _dense(params, x):
  """nn.Dense's forward on a {'kernel', 'bias'} dict (the same ops)."""
  return nn.Dense(params['kernel'].shape[-1], parent=None).apply(
      {'params': params}, x)


def _reg_from_params(params, x):
  """_apply_reg on {'0': dense params, '2': ..., '4': ...}."""
  x = jax.nn.relu(_dense(params['0'], x))
  x = jax.nn.relu(_dense(params['2'], x))
  return _dense(params['4'], x)


class DDQHead(nn.Module):
  """Holds every branch; ``__call__`` is the head's forward.

  Methods ``cls(i, x)``, ``reg(i, x)``, ``aux_cls(i, x)``, ``aux_reg(i, x)``
  apply one branch: ``i`` a static int, or a traced int of a decoder layer
  (inside the decoder's scan): then branch ``i`` of the first L is read from
  their parameters stacked on the fly, so one traced branch serves every
  layer (the parameter tree keeps one entry per branch).
  """
  num_classes: int = 80
  embed_dims: int = 256
  num_decoder_layers: int = 6

  @classmethod
  def from_config(cls, config) -> 'DDQHead':
    return cls(num_classes=config.num_classes, embed_dims=config.embed_dims,
               num_decoder_layers=config.num_decoder_layers)

  def setup(self):
    n, c, k = self.num_decoder_layers, self.embed_dims, self.num_classes
    # One key shared by every branch (they start as copies of one another);
    # outside init no parameter is created, so no key is needed.
    key = self.make_rng('params') if self.is_initializing() else None
    self.cls_branches = [_cls_branch(k, c, key) for _ in range(n + 2)]
    self.reg_branches = [_reg_branch(c, key) for _ in range(n + 2)]
    self.aux_cls_branches = [_cls_branch(k, c, key) for _ in range(n)]
    self.aux_reg_branches = [_reg_branch(c, key) for _ in range(n)]

  def _layer_params(self, prefix: str, i, reg: bool):
    """Branch ``i`` (traced) of ``{prefix}_0 .. {prefix}_{L-1}``."""
    p = self.variables['params']
    names = [f'{prefix}_{l}' for l in range(self.num_decoder_layers)]
    if reg:
      tree = {k: stack_trees([p[f'{n}_{k}'] for n in names])
              for k in REG_LAYERS}
    else:
      tree = stack_trees([p[n] for n in names])
    return jax.tree.map(lambda a: a[i], tree)

  def _apply(self, branches, prefix: str, i, x, reg: bool):
    if isinstance(i, int) or self.is_initializing():
      return (_apply_reg if reg else lambda b, y: b(y))(branches[i], x)
    params = self._layer_params(prefix, i, reg)
    return (_reg_from_params if reg else _dense)(params, x)

  def cls(self, i, x: jnp.ndarray) -> jnp.ndarray:
    return self._apply(self.cls_branches, 'cls_branches', i, x, False)

  def reg(self, i, x: jnp.ndarray) -> jnp.ndarray:
    return self._apply(self.reg_branches, 'reg_branches', i, x, True)

  def aux_cls(self, i, x: jnp.ndarray) -> jnp.ndarray:
    return self._apply(self.aux_cls_branches, 'aux_cls_branches', i, x,
                       False)

  def aux_reg(self, i, x: jnp.ndarray) -> jnp.ndarray:
    return self._apply(self.aux_reg_branches, 'aux_reg_branches', i, x,
                       True)

  def __call__(self, hidden_states: jnp.ndarray, references: jnp.ndarray, *,
               num_dense: int = 0):
    """Per-layer predictions.

    Args:
      hidden_states: (L, B, Q, C) decoder outputs (after the decoder norm).
      references: (L + 1, B, Q, 4) sigmoid cxcywh; layer l uses
        references[l] (its input reference).
      num_dense: static number of dense queries at the end of Q (training);
        they use the aux branches.

    Returns:
      all_layers_cls_scores (L, B, Q, K) logits,
      all_layers_bbox_preds (L, B, Q, 4) sigmoid cxcywh.
    """
    n = hidden_states.shape[0]
    if n > 1 and n == self.num_decoder_layers and not self.is_initializing():
      # Every layer at once over its stacked branches: traced once.
      kinds = (('cls_branches', False), ('reg_branches', True)) + (
          (('aux_cls_branches', False), ('aux_reg_branches', True))
          if num_dense else ())
      ps = [self._layer_params(name, slice(None), reg) for name, reg in kinds]
      ps += [None] * (4 - len(ps))
      refs = inverse_sigmoid(references[:n], eps=HEAD_INV_SIGMOID_EPS)
      cls, reg = jax.vmap(functools.partial(_layer_forward,
                                            num_dense=num_dense))(
          *ps, hidden_states)
      return cls, jax.nn.sigmoid(reg + refs)
    classes, coords = [], []
    for l in range(n):
      ref = inverse_sigmoid(references[l], eps=HEAD_INV_SIGMOID_EPS)
      h = hidden_states[l]
      if num_dense:
        cls = jnp.concatenate([self.cls(l, h[:, :-num_dense]),
                               self.aux_cls(l, h[:, -num_dense:])], 1)
        reg = jnp.concatenate([self.reg(l, h[:, :-num_dense]),
                               self.aux_reg(l, h[:, -num_dense:])], 1)
      else:
        cls, reg = self.cls(l, h), self.reg(l, h)
      classes.append(cls)
      coords.append(jax.nn.sigmoid(reg + ref))
    return jnp.stack(classes), jnp.stack(coords)


def _layer_forward(cls_p, reg_p, aux_cls_p, aux_reg_p, h, *, num_dense: int):
  """One decoder layer's (logits, box deltas) from its branch parameters;
  h (B, Q, C), the last ``num_dense`` queries through the aux branches."""
  if not num_dense:
    return _dense(cls_p, h), _reg_from_params(reg_p, h)
  main, dense = h[:, :-num_dense], h[:, -num_dense:]
  cls = jnp.concatenate([_dense(cls_p, main), _dense(aux_cls_p, dense)], 1)
  reg = jnp.concatenate([_reg_from_params(reg_p, main),
                         _reg_from_params(aux_reg_p, dense)], 1)
  return cls, reg
