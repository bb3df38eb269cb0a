"""The reference's optimiser (``optimizer.py``) as one update on flat vectors.

The arithmetic is ``torch_adamw``'s, element for element (the same
``adamw_element_update``); what changes is how XLA sees it.  Composed per
parameter (optax's ``chain`` / ``multi_transform`` / ``tree.map``), the
update is one fused loop per parameter and kind of work: the clip's norm and
scaling, the moments, the parameter, ``apply_updates`` -- about 50k lines of
HLO for R50's 525 parameters, most of the training step.  Here the trainable
parameters of each lr group ('default', 'backbone') are concatenated into
one vector, the whole update (clip, moments, parameters) runs once per group
on the vectors, and the results are sliced back into the per-parameter
layout, which the state keeps (checkpoints, 'model' sharding, restoring into
another mesh unchanged).

The update runs inside ``run_unfused``: a ``while`` loop of one trip that
XLA cannot prove is one trip.  Its result is a materialised buffer, so XLA
cannot push the slices back into the update (without it, XLA:CPU
recomputes the whole update once per parameter; it also drops
``optimization_barrier``).  The same loop is the non-finite guard: zero
trips when the step is not to be applied, so parameters and state come back
bit for bit as they were.

With ``mesh.model > 1`` or ``optim.flat_update=False`` every parameter is
its own group (no concatenation): model-sharded parameters and their
moments stay local, and a large model has no flat copies at its peak.

State (per-parameter layout; frozen parameters have no moments)::

    FlatAdamWState(count int32[], mu {path: (*shape) | MaskedNode},
                   nu (same), lrs {'lr': f32[], 'lr_backbone': f32[]})

``lrs`` holds the lrs of the most recent applied update (the metrics' lr).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

FROZEN, BACKBONE, DEFAULT = 'frozen', 'backbone', 'default'
GROUPS = (DEFAULT, BACKBONE)


def lr_metric_name(group: str) -> str:
  return 'lr' if group == DEFAULT else f'lr_{group}'


class FlatAdamWState(NamedTuple):
  count: jax.Array  # int32[], updates applied
  mu: Any           # exp_avg, params' tree (frozen leaves: MaskedNode)
  nu: Any           # exp_avg_sq
  lrs: dict         # {'lr': f32[], 'lr_backbone': f32[]} of the last update


def run_unfused(fn: Callable, carry, *, trips: jax.Array):
  """``fn(carry)`` (a tree shaped like ``carry``) applied ``trips`` times
  (0 or 1, traced) in a ``while`` loop whose result XLA has to materialise.
  """
  trips = jnp.asarray(trips, jnp.int32)

  def body(state):
    i, c = state
    return i + 1, fn(c)
  _, out = jax.lax.while_loop(lambda state: state[0] < trips, body,
                              (jnp.zeros((), jnp.int32), carry))
  return out


def adamw_element_update(p, m, v, g, *, step_size, bc2_sqrt, decay, zero,
                         b1: float, b2: float, eps: float):
  """torch ``_single_tensor_adam`` (decoupled decay) on arrays of any shape:
  -> (new p, new m, new v).  ``decay = 1 - lr * wd`` (float32 scalar),
  ``step_size = lr / bc1``, ``bc2_sqrt = sqrt(bc2)``; ``zero`` an int32
  scalar XLA cannot prove to be 0: OR-ing it into ``p * decay``'s bits keeps
  that product rounded on its own, as torch's separate kernel (XLA would
  otherwise fuse it with the next add into one fused multiply-add)."""
  m = m + (1.0 - b1) * (g - m)
  v = v * b2 + (1.0 - b2) * g * g
  bits = jnp.dtype(f'int{jnp.dtype(p.dtype).itemsize * 8}')
  decayed = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(p * decay, bits) | zero.astype(bits),
      p.dtype)
  new = decayed + (-step_size * m) / (jnp.sqrt(v) / bc2_sqrt + eps)
  return new.astype(p.dtype), m, v


def bias_corrections(count, *, b1: float, b2: float):
  """(1 - b1**t, sqrt(1 - b2**t)) for t = count + 1, from the exact float
  betas (torch computes them in double)."""
  t = (count + 1).astype(jnp.float32)
  return (-jnp.expm1(t * math.log(b1)),
          jnp.sqrt(-jnp.expm1(t * math.log(b2))))


class FlatAdamW:
  """init(params) -> state; step(grads, state, params, ok=) -> (params,
  state, info); update(grads, state, params) -> (updates, state) (optax
  style).

  Args:
    labels_fn: params tree -> labels tree ('frozen' | 'backbone' |
      'default'); static per tree structure.
    schedule: step (int32, updates applied so far) -> base lr.
    lr_mults: {'default': 1.0, 'backbone': m}.
    weight_decay, max_norm (0: no clip), b1, b2, eps: torch AdamW /
      clip_grad_norm_ settings.
    concat: one vector per group (True) or every parameter apart.
  """

  def __init__(self, *, labels_fn, schedule, lr_mults: dict,
               weight_decay: float, max_norm: float = 0.0, b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-8, concat: bool = True):
    self.labels_fn, self.schedule = labels_fn, schedule
    self.lr_mults = dict(lr_mults)
    self.weight_decay, self.max_norm = float(weight_decay), float(max_norm)
    self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)
    self.concat = bool(concat)

  # -------------------------------------------------------------- state
  def _trainable(self, params):
    return jax.tree.map(lambda l: l != FROZEN, self.labels_fn(params))

  def init(self, params) -> FlatAdamWState:
    mask = self._trainable(params)
    zeros = lambda: jax.tree.map(  # noqa: E731  (new buffers per call)
        lambda p, t: jnp.zeros_like(p) if t else optax.MaskedNode(),
        params, mask)
    lrs = {lr_metric_name(g): jnp.zeros((), jnp.float32) for g in GROUPS}
    return FlatAdamWState(count=jnp.zeros((), jnp.int32), mu=zeros(),
                          nu=zeros(), lrs=lrs)

  def group_lrs(self, count) -> dict:
    base = jnp.asarray(self.schedule(count), jnp.float32)
    return {g: (base * self.lr_mults[g]) if self.lr_mults[g] != 1.0
            else base for g in GROUPS}

  # -------------------------------------------------------------- update
  def _groups(self, labels: Sequence[str]) -> list[tuple[str, list[int]]]:
    """[(lr group, leaf indices)]: one entry per group, or per leaf."""
    out = []
    for g in GROUPS:
      idx = [i for i, l in enumerate(labels) if l == g]
      if not idx:
        continue
      out += [(g, idx)] if self.concat else [(g, [i]) for i in idx]
    return out

  def step(self, grads, state: FlatAdamWState, params, *, ok=True):
    """-> (params, state, info).  The update is applied when ``ok`` (a
    traced bool, e.g. the loss is finite) and the gradient norm is finite;
    otherwise params and state come back bit for bit.  info: 'grad_norm'
    (before clipping, over the trainable parameters) and 'applied'.
    grads / params: the same tree."""
    p_leaves, tdef = jax.tree.flatten(params)
    g_leaves = tdef.flatten_up_to(grads)
    labels = tdef.flatten_up_to(self.labels_fn(params))
    mu_leaves = tdef.flatten_up_to(state.mu)
    nu_leaves = tdef.flatten_up_to(state.nu)
    groups = self._groups(labels)

    def join(leaves, idx):
      if len(idx) == 1:
        return leaves[idx[0]]
      return jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])

    g_vec = [join(g_leaves, idx) for _, idx in groups]
    sq = [jnp.sum(jnp.square(v.astype(jnp.float32))) for v in g_vec]
    norm = jnp.sqrt(sum(sq)) if sq else jnp.zeros((), jnp.float32)
    if self.max_norm > 0:
      # torch clip_grad_norm_: g * min(1, max / (norm + 1e-6)), rounded.
      coef = jnp.minimum(1.0, self.max_norm / (norm + 1e-6))
      g_vec = [(v * coef).astype(v.dtype) for v in g_vec]
    carry = ([join(p_leaves, idx) for _, idx in groups],
             [join(mu_leaves, idx) for _, idx in groups],
             [join(nu_leaves, idx) for _, idx in groups])
    lrs = self.group_lrs(state.count)
    bc1, bc2_sqrt = bias_corrections(state.count, b1=self.b1, b2=self.b2)
    kw = dict(bc2_sqrt=bc2_sqrt, zero=jnp.minimum(state.count, 0),
              b1=self.b1, b2=self.b2, eps=self.eps)

    def update(c):
      out = [adamw_element_update(
          p, m, v, g, step_size=lrs[name] / bc1,
          decay=1.0 - lrs[name] * self.weight_decay, **kw)
          for (name, _), p, m, v, g in zip(groups, *c, g_vec)]
      return tuple([o[k] for o in out] for k in range(3))
    applied = jnp.asarray(ok, bool) & jnp.isfinite(norm)
    ps, ms, vs = run_unfused(update, carry, trips=applied)
    count = state.count + applied.astype(state.count.dtype)

    new_p, new_mu, new_nu = list(p_leaves), list(mu_leaves), list(nu_leaves)
    for (_, idx), pv, mv, vv in zip(groups, ps, ms, vs):
      if len(idx) == 1:
        new_p[idx[0]], new_mu[idx[0]], new_nu[idx[0]] = pv, mv, vv
        continue
      off = 0
      for i in idx:
        n, shape = p_leaves[i].size, p_leaves[i].shape
        new_p[i] = pv[off:off + n].reshape(shape)
        new_mu[i] = mv[off:off + n].reshape(shape)
        new_nu[i] = vv[off:off + n].reshape(shape)
        off += n
    lrs = {lr_metric_name(g): jnp.where(applied, v, state.lrs[
        lr_metric_name(g)]) for g, v in lrs.items()}
    new_state = FlatAdamWState(count=count, mu=tdef.unflatten(new_mu),
                               nu=tdef.unflatten(new_nu), lrs=lrs)
    return tdef.unflatten(new_p), new_state, dict(grad_norm=norm,
                                                  applied=applied)

  def update(self, grads, state, params):
    """optax-style: (updates = new params - params, new state)."""
    new_params, new_state, _ = self.step(grads, state, params)
    return jax.tree.map(lambda n, p: n - p, new_params, params), new_state
