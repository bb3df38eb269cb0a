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

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddq_jax.models import initializers as inits
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


class DDQHead(nn.Module):
  """Holds every branch; ``__call__`` is the head's forward.

  Methods ``cls(i, x)``, ``reg(i, x)``, ``aux_cls(i, x)``, ``aux_reg(i, x)``
  apply one branch (i a static int).
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

  def cls(self, i: int, x: jnp.ndarray) -> jnp.ndarray:
    return self.cls_branches[i](x)

  def reg(self, i: int, x: jnp.ndarray) -> jnp.ndarray:
    return _apply_reg(self.reg_branches[i], x)

  def aux_cls(self, i: int, x: jnp.ndarray) -> jnp.ndarray:
    return self.aux_cls_branches[i](x)

  def aux_reg(self, i: int, x: jnp.ndarray) -> jnp.ndarray:
    return _apply_reg(self.aux_reg_branches[i], x)

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
    classes, coords = [], []
    for l in range(hidden_states.shape[0]):
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
