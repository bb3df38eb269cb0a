"""DDQ-DETR's detection head: the class / box branches and their forward.

Reference: mmdet 3.3.0 ``dense_heads/ddq_detr_head.py`` (over DINOHead /
DeformableDETRHead, ``as_two_stage=True``, ``with_box_refine=True``).

Branches (L = decoder layers; torch's ModuleList entry i is entry i of the
stacked parameters, every leaf with a leading branch axis):
  cls_branches/{kernel,bias}        L + 2 Linear(C, num_classes)
  reg_branches/{0,2,4}/{kernel,bias} L + 2 Linear-ReLU-Linear-ReLU-Linear(C, 4)
    (0..L-1: decoder layers; L: the encoder proposals; L+1: the dense
    encoder proposals)
  aux_cls_branches, aux_reg_branches  L entries: the dense queries of every
    decoder layer.

Init (``DeformableDETRHead._init_layers`` + ``DDQDETRHead.init_weights``):
every branch is a deepcopy of one torch-default Linear / reg MLP, so all
branches start identical (one draw per layer kind, copied to every branch,
the aux branches copies of the main ones); class biases
bias_init_with_prob(0.01) = -log(99); each reg branch's last Linear weight
0 and bias 0.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.core
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ddq_jax.model import initializers as inits
from ddq_jax.ops.boxes import inverse_sigmoid

HEAD_INV_SIGMOID_EPS = 1e-5
CLS_PRIOR_PROB = 0.01
REG_LAYERS = ('0', '2', '4')


# Every branch draws from the head's first 'params' key: the class weight
# from fold_in(key, 0), the reg MLP's two Linears from fold_in(key, 1) and
# fold_in(key, 2) (weight, bias = split of that key).


def _cls_init(embed_dims: int, num_classes: int):
  """One class branch: torch-default Linear weight, prior bias."""
  def init(rng):
    return {'kernel': inits.torch_linear_kernel(
                jax.random.fold_in(rng, 0), (embed_dims, num_classes)),
            'bias': jnp.full((num_classes,), inits.bias_init_with_prob(
                CLS_PRIOR_PROB), jnp.float32)}
  return init


def _reg_init(embed_dims: int):
  """One reg branch: two torch-default Linears, the last Linear zero."""
  def init(rng):
    out = {}
    for i, name in ((1, '0'), (2, '2')):
      kw, kb = jax.random.split(jax.random.fold_in(rng, i))
      out[name] = {
          'kernel': inits.torch_linear_kernel(kw, (embed_dims, embed_dims)),
          'bias': inits.torch_linear_bias(embed_dims)(kb, (embed_dims,))}
    out['4'] = {'kernel': jnp.zeros((embed_dims, 4), jnp.float32),
                'bias': jnp.zeros((4,), jnp.float32)}
    return out
  return init


def _copies(init, key, num: int):
  """A ``param`` init: ``init(key)`` drawn once, copied to ``num`` stacked
  branches (``key`` None outside init, where flax checks shapes with its
  own rng)."""
  return lambda rng: jax.tree.map(
      lambda a: jnp.broadcast_to(a, (num,) + a.shape),
      init(rng if key is None else key))


def branch(stacked, i):
  """Branch ``i`` (an int or a traced index) of stacked branches."""
  return jax.tree.map(lambda a: a[i], stacked)


def first(stacked, num: int):
  """The first ``num`` of stacked branches."""
  return jax.tree.map(lambda a: a[:num], stacked)


def dense(params, x):
  """nn.Dense's forward on a {'kernel', 'bias'} dict (the same ops)."""
  return nn.Dense(params['kernel'].shape[-1], parent=None).apply(
      {'params': params}, x)


def reg_mlp(params, x):
  """A reg branch (Linear-ReLU-Linear-ReLU-Linear) on
  {'0': dense params, '2': ..., '4': ...}."""
  x = jax.nn.relu(dense(params['0'], x))
  x = jax.nn.relu(dense(params['2'], x))
  return dense(params['4'], x)


@flax.struct.dataclass
class LayerBranches:
  """The head's branches of the decoder layers (leading axis L): what layer
  l's refinement and distinct-query scoring read."""
  cls: Any
  reg: Any
  aux_reg: Optional[Any] = None


class DDQHead(nn.Module):
  """Holds every branch (stacked); ``__call__`` is the head's forward.

  ``cls(i, x)``, ``reg(i, x)`` apply branch ``i``; ``decoder_branches``
  gives the first L (the decoder layers') for the decoder's scan.
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
    # One key for every branch (they start as copies of one draw); outside
    # init no parameter is created and no key is needed.
    key = self.make_rng('params') if self.is_initializing() else None
    self.cls_branches = self.param('cls_branches',
                                   _copies(_cls_init(c, k), key, n + 2))
    self.reg_branches = self.param('reg_branches',
                                   _copies(_reg_init(c), key, n + 2))
    # Copies of the main branches (the reference's deepcopies of one);
    # setup's attributes are frozen: the copies are plain dicts again.
    self.aux_cls_branches = self.param(
        'aux_cls_branches',
        lambda _: flax.core.unfreeze(first(self.cls_branches, n)))
    self.aux_reg_branches = self.param(
        'aux_reg_branches',
        lambda _: flax.core.unfreeze(first(self.reg_branches, n)))

  def cls(self, i, x: jnp.ndarray) -> jnp.ndarray:
    return dense(branch(self.cls_branches, i), x)

  def reg(self, i, x: jnp.ndarray) -> jnp.ndarray:
    return reg_mlp(branch(self.reg_branches, i), x)

  def decoder_branches(self, *, num_dense: int = 0) -> LayerBranches:
    """The branches of the L decoder layers; the aux reg branches only
    with dense queries."""
    n = self.num_decoder_layers
    return LayerBranches(
        cls=first(self.cls_branches, n), reg=first(self.reg_branches, n),
        aux_reg=self.aux_reg_branches if num_dense else None)

  def __call__(self, hidden_states: jnp.ndarray, references: jnp.ndarray, *,
               num_dense: int = 0):
    """Per-layer predictions, every layer at once over its branches.

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
    ps = [first(self.cls_branches, n), first(self.reg_branches, n)]
    ps += ([first(self.aux_cls_branches, n), first(self.aux_reg_branches, n)]
           if num_dense else [None, None])
    refs = inverse_sigmoid(references[:n], eps=HEAD_INV_SIGMOID_EPS)
    cls, reg = jax.vmap(functools.partial(_layer_forward,
                                          num_dense=num_dense))(
        *ps, hidden_states)
    return cls, jax.nn.sigmoid(reg + refs)


def _layer_forward(cls_p, reg_p, aux_cls_p, aux_reg_p, h, *, num_dense: int):
  """One decoder layer's (logits, box deltas) from its branch parameters;
  h (B, Q, C), the last ``num_dense`` queries through the aux branches."""
  if not num_dense:
    return dense(cls_p, h), reg_mlp(reg_p, h)
  main, extra = h[:, :-num_dense], h[:, -num_dense:]
  cls = jnp.concatenate([dense(cls_p, main), dense(aux_cls_p, extra)], 1)
  reg = jnp.concatenate([reg_mlp(reg_p, main), reg_mlp(aux_reg_p, extra)], 1)
  return cls, reg
