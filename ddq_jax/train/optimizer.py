"""The optimiser of the reference (mmengine 0.x / mmdet 3.3.0 DDQ configs).

    optim_wrapper = dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.05),
                         clip_grad=dict(max_norm=0.1, norm_type=2),
                         paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}))
    param_scheduler = [LinearLR(start_factor=1e-4, by_epoch=False, begin=0, end=2000),
                       MultiStepLR(milestones=[11], gamma=0.1, by_epoch=True)]

What this reproduces, and why:

* torch AdamW (decoupled decay ``p *= 1 - lr * wd``, eps 1e-8, betas
  (0.9, 0.999)) on every parameter that has ``requires_grad``: the config has
  no ``norm_decay_mult`` / ``bias_decay_mult``, so norms and biases decay too.
  ``torch_adamw`` follows torch's float32 operation order (decay first, as
  its own rounded step); ``optax.adamw``'s single rounding drifts from it by
  float32 ulps per step (see ``torch_adamw``).
* ``custom_keys={'backbone': lr_mult}`` multiplies the lr of every parameter
  whose name contains 'backbone' (the decay is multiplied by that lr as well,
  as in torch, because AdamW scales decay by the group lr).
* Parameters with ``requires_grad=False`` get no update at all (torch skips a
  parameter whose ``.grad`` is None, weight decay included) and no state:
  the stem (conv1, bn1) and stages 1..frozen_stages (``ResNet._freeze_stages``)
  and every backbone BatchNorm affine (``norm_cfg=dict(type='BN',
  requires_grad=False)``).  Which parameters are frozen, and each group's
  lr multiplier, is one list of ``(regex, lr_mult or None)`` over the
  parameter paths (``model/param_groups.py``): derived once from the
  backbone type, ``backbone.frozen_stages`` / ``backbone.bn_trainable`` and
  the config's ``optim.frozen_params``; the backbones read the same list
  to stop their gradients.  Frozen
  parameters get neither an update (AdamW would otherwise decay them) nor
  moments.  The ``batch_stats`` collection is never touched by the optimiser.
* ``clip_grad_norm_``: ``g *= min(1, max_norm / (total_norm + 1e-6))`` over the
  trainable gradients (torch's epsilon, not optax's ``clip_by_global_norm``).
* Schedule by iteration ``t`` (0-based index of the iteration being run;
  mmengine steps the schedulers after each iteration):
  LinearLR: ``start + (1 - start) * min(t, T) / T`` with ``T = end - begin - 1``
  (mmengine's ``total_iters``), then MultiStepLR: ``x gamma`` for each
  milestone epoch ``m`` with ``t >= m * steps_per_epoch`` (mmengine converts
  epoch milestones to iterations with the epoch length).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ddq_jax.model import param_groups
from ddq_jax.model.param_groups import BACKBONE, DEFAULT, FROZEN  # noqa: F401  (re-exported)
from ddq_jax.train.flat_optimizer import FlatAdamW, adamw_element_update, bias_corrections
from ddq_jax.train.parallel import sharding as shd
from ddq_jax.ops.xla_cpu import opaque_zero
from ddq_jax.tree_paths import map_with_paths


def lr_factor(step, *, warmup_steps: int, warmup_factor: float,
              decay_steps=(), decay_factor: float = 0.1):
  """The lr multiplier at iteration ``step`` (int or traced int array)."""
  t = jnp.asarray(step, jnp.float32)
  if warmup_steps > 1:
    total = float(warmup_steps - 1)
    warm = warmup_factor + (1.0 - warmup_factor) * jnp.minimum(t, total) / total
  else:  # end - begin - 1 == 0: only iteration 0 is scaled.
    warm = jnp.where(t < 1, warmup_factor, 1.0) if warmup_steps == 1 else 1.0
  decay = jnp.ones((), jnp.float32)
  for d in decay_steps:
    decay = decay * jnp.where(t >= d, decay_factor, 1.0)
  return warm * decay


def make_schedule(config, steps_per_epoch: int) -> Callable[[Any], jax.Array]:
  """step -> base learning rate (before the backbone multiplier)."""
  o = config.optim
  decay_steps = tuple(int(e) * int(steps_per_epoch) for e in o.decay_epochs)

  def schedule(step):
    return o.lr * lr_factor(step, warmup_steps=int(o.warmup_steps),
                            warmup_factor=float(o.warmup_factor),
                            decay_steps=decay_steps,
                            decay_factor=float(o.decay_factor))
  return schedule


def param_labels(params, config):
  """A pytree of labels ('frozen' | 'backbone' | 'default') with the
  structure of ``params``, from ``param_groups.param_rules(config)``:
  frozen, else 'backbone' (lr x ``optim.backbone_lr_mult``, mmengine's
  ``custom_keys``) for paths with a 'backbone' component."""
  rules = param_groups.param_rules(config)
  return map_with_paths(lambda name, _: param_groups.label(name, rules),
                        params)


class TorchAdamWState(NamedTuple):
  count: jax.Array  # int32[], steps taken
  mu: Any           # exp_avg
  nu: Any           # exp_avg_sq


def torch_adamw(learning_rate, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-8, weight_decay: float = 0.0
                ) -> optax.GradientTransformation:
  """torch.optim.AdamW in torch's order of float32 operations.

  Per parameter, as torch's ``_single_tensor_adam`` (decoupled decay):
  ``p = p * (1 - lr * wd)`` (the factor rounded to float32, the product
  rounded), then ``p = p + (-lr / bc1) * mu / (sqrt(nu) / sqrt(bc2) + eps)``:
  two roundings of ``p`` per step.  ``optax.adamw`` computes the same
  update in exact arithmetic, but rounds ``p`` once and decays by ``lr * wd``
  unrounded (at lr 1e-5 the float32 factor ``1 - 5e-7`` is ``1 - 4.77e-7``,
  a 5% smaller decay): a drift of float32 ulps per step, up to 0.6% of what
  six steps at the backbone's lr 1e-5 change.  The bias corrections come
  from the exact float betas (torch computes them in double; float32
  ``0.999 ** t`` is 1.3e-5 off in ``1 - 0.999``).  ``b1``, ``b2`` and ``eps``
  must be Python floats (``inject_hyperparams(..., static_args=...)``).

  The update returned is ``new_p - p`` (exact while the two are within a
  factor 2), so ``apply_updates`` gives ``new_p``.  The training step uses
  the same per-element arithmetic on flat vectors (``FlatAdamW``); this
  per-tree form is the readable one, for tests and single transforms.
  """
  def init_fn(params):
    return TorchAdamWState(count=jnp.zeros([], jnp.int32),
                           mu=jax.tree.map(jnp.zeros_like, params),
                           nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('torch_adamw needs params (decoupled weight decay)')
    lr = jnp.asarray(learning_rate, jnp.float32)
    bc1, bc2_sqrt = bias_corrections(state.count, b1=b1, b2=b2)
    kw = dict(step_size=lr / bc1, bc2_sqrt=bc2_sqrt,
              decay=1.0 - lr * weight_decay,
              zero=opaque_zero(state.count), b1=b1, b2=b2, eps=eps)
    out = jax.tree.map(lambda p, m, v, g: adamw_element_update(
        p, m, v, g, **kw), params, state.mu, state.nu, grads)
    is_out = lambda x: isinstance(x, tuple)  # noqa: E731
    pick = lambda k: jax.tree.map(lambda o: o[k], out, is_leaf=is_out)  # noqa: E731
    updates = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), pick(0),
                           params)
    return updates, TorchAdamWState(count=state.count + 1, mu=pick(1),
                                    nu=pick(2))
  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config, steps_per_epoch: int, params=None):
  """The reference's optim_wrapper as one ``FlatAdamW``
  (``flat_optimizer.py``): clip, AdamW per lr group, frozen parameters
  untouched.

  Args:
    config: the ml_collections config (sections optim, backbone, mesh;
      ``optim.flat_update``: one vector per lr group, else per parameter).
    steps_per_epoch: iterations per epoch (MultiStepLR milestones).
    params: unused (the labels are computed from the tree given to
      ``init`` / ``step``).

  Returns:
    (tx, schedule): ``tx`` a FlatAdamW (``init``, ``step``, optax-style
    ``update``); ``schedule`` maps a step to the base lr (the backbone's is
    ``backbone_lr_mult`` x that).
  """
  del params
  o = config.optim
  schedule = make_schedule(config, steps_per_epoch)
  model_axis = int(config.mesh.model)
  tx = FlatAdamW(
      labels_fn=lambda p: param_labels(p, config), schedule=schedule,
      lr_mults=param_groups.lr_mults(param_groups.param_rules(config)),
      weight_decay=float(o.weight_decay),
      max_norm=float(o.clip_norm or 0.0),
      concat=(bool(o.flat_update) and model_axis <= 1 and
              not shd.shards_parameters_over_data(config)))
  return tx, schedule


def current_lrs(opt_state) -> dict[str, jax.Array]:
  """{'lr': default group lr, 'lr_backbone': ...}: the lrs of the most
  recent applied update."""
  return dict(opt_state.lrs)
