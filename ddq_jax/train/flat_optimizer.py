"""The reference's optimiser (``optimizer.py``) as one update on flat vectors.

The arithmetic is ``torch_adamw``'s, element for element (the same
``adamw_element_update``); what changes is how XLA sees it.  Composed per
parameter (optax's ``chain`` / ``multi_transform`` / ``tree.map``), the
update is one fused loop per parameter and kind of work: the clip's norm and
scaling, the moments, the parameter, ``apply_updates`` -- about 50k lines of
HLO for R50's 525 parameters, most of the training step.  Here the trainable
parameters of each lr group ('default', 'backbone') are concatenated into
one vector, the whole update (clip, moments, parameters) runs once per group
on the vectors, and the new parameters are sliced back into their tree.  The
moments stay vectors (``FlatMoments``): slicing them back too was 2 x 408
slices, ~6k lines of R50's step.  Checkpoints hold the per-parameter layout
all the same (``canonical_opt_state`` / ``from_canonical_opt_state``, used
by ``checkpoint.py``), so a checkpoint restores into either layout and any
mesh.

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

State (frozen parameters have no moments)::

    FlatAdamWState(count int32[],
                   mu FlatMoments {group: f32[n_group]} (concatenated) or
                      {path: (*shape) | MaskedNode} (per parameter),
                   nu (same), lrs {'lr': f32[], 'lr_backbone': f32[]})

``lrs`` holds the lrs of the most recent applied update (the metrics' lr).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddq_jax.model.param_groups import BACKBONE, DEFAULT, FROZEN
from ddq_jax.ops.xla_cpu import opaque_zero, rounded_alone, run_unfused
from ddq_jax.train.parallel import sharding as sharding_lib
from ddq_jax.tree_paths import leaf_paths

GROUPS = (DEFAULT, BACKBONE)


def lr_metric_name(group: str) -> str:
  return 'lr' if group == DEFAULT else f'lr_{group}'


class FlatAdamWState(NamedTuple):
  count: jax.Array  # int32[], updates applied
  mu: Any           # exp_avg: FlatMoments, or params' tree (frozen: MaskedNode)
  nu: Any           # exp_avg_sq
  lrs: dict         # {'lr': f32[], 'lr_backbone': f32[]} of the last update


@jax.tree_util.register_pytree_with_keys_class
class FlatMoments:
  """One moment of the trainable parameters as a vector per lr group.

  ``layout`` (static): ((group, ((parameter path, shape), ...)), ...), in
  vector order.
  Children: the vectors, named by group ('opt_state/mu/default').
  """

  def __init__(self, vectors, layout):
    self.vectors, self.layout = tuple(vectors), layout

  def tree_flatten_with_keys(self):
    return ([(jax.tree_util.DictKey(g), v)
             for (g, _), v in zip(self.layout, self.vectors)], self.layout)

  def tree_flatten(self):
    return self.vectors, self.layout

  @classmethod
  def tree_unflatten(cls, layout, vectors):
    return cls(vectors, layout)

  def __repr__(self):
    return f'FlatMoments({dict(zip((g for g, _ in self.layout), self.vectors))})'


def _paths(tree) -> list[str]:
  return leaf_paths(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def moments_layout(params, labels: Sequence[str]) -> tuple:
  """FlatMoments' layout for ``params`` whose leaves have these labels."""
  paths, leaves = _paths(params), jax.tree.leaves(params)
  out = []
  for g in GROUPS:
    idx = [i for i, l in enumerate(labels) if l == g]
    if idx:
      out.append((g, tuple((paths[i], tuple(np.shape(leaves[i])))
                           for i in idx)))
  return tuple(out)


def per_parameter_moments(moments: FlatMoments, params):
  """FlatMoments -> {path: (*shape)} (frozen leaves MaskedNode), shaped as
  ``params``: arrays placed with their vector's sharding, cut from one host
  copy of it; ``jax.ShapeDtypeStruct`` vectors give structs."""
  by_path = {}
  for (_, items), vec in zip(moments.layout, moments.vectors):
    if isinstance(vec, jax.ShapeDtypeStruct):
      for path, shape in items:
        by_path[path] = jax.ShapeDtypeStruct(shape, vec.dtype,
                                             sharding=vec.sharding)
      continue
    host = np.asarray(_host(vec))
    off = 0
    for path, shape in items:
      n = math.prod(shape)
      by_path[path] = sharding_lib.from_host(
          host[off:off + n].reshape(shape), vec.sharding)
      off += n
  tdef = jax.tree.structure(params)
  return tdef.unflatten([by_path.get(p, optax.MaskedNode())
                         for p in _paths(params)])


def flat_moments(tree, like: FlatMoments) -> FlatMoments:
  """{path: (*shape)} -> FlatMoments laid out and placed as ``like``."""
  by_path = dict(zip(_paths(tree), jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))))
  vectors = []
  for (_, items), vec in zip(like.layout, like.vectors):
    missing = [p for p, _ in items if not hasattr(by_path.get(p), 'shape')]
    if missing:
      raise ValueError(f'moments of {missing[:3]} missing')
    host = np.concatenate([np.asarray(_host(by_path[p])).ravel()
                           for p, _ in items]).astype(vec.dtype)
    vectors.append(sharding_lib.from_host(host,
                                         getattr(vec, 'sharding', None)))
  return FlatMoments(vectors, like.layout)


def _host(x):
  """A replicated array's value on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError(f'flat moments must be replicated, got {x.sharding}')
    return x.addressable_data(0)
  return x


def canonical_opt_state(opt_state, params):
  """The checkpoint layout of an optimiser state: FlatMoments become
  per-parameter trees; anything else is returned as it is."""
  if not isinstance(opt_state, FlatAdamWState) or not isinstance(
      opt_state.mu, FlatMoments):
    return opt_state
  return opt_state._replace(mu=per_parameter_moments(opt_state.mu, params),
                            nu=per_parameter_moments(opt_state.nu, params))


def from_canonical_opt_state(canonical, target):
  """Inverse of ``canonical_opt_state``: ``canonical`` in the layout (and
  placement) of ``target``, an optimiser state of arrays or structs."""
  if not isinstance(target, FlatAdamWState) or not isinstance(
      target.mu, FlatMoments):
    return canonical
  return canonical._replace(mu=flat_moments(canonical.mu, target.mu),
                            nu=flat_moments(canonical.nu, target.nu))


def adamw_element_update(p, m, v, g, *, step_size, bc2_sqrt, decay, zero,
                         b1: float, b2: float, eps: float):
  """torch ``_single_tensor_adam`` (decoupled decay) on arrays of any shape:
  -> (new p, new m, new v).  ``decay = 1 - lr * wd`` (float32 scalar),
  ``step_size = lr / bc1``, ``bc2_sqrt = sqrt(bc2)``; ``zero``: an
  ``xla_cpu.opaque_zero``, which keeps ``p * decay`` rounded on its own, as
  torch's separate kernel (``xla_cpu.rounded_alone``: no fused
  multiply-add with the next add)."""
  m = m + (1.0 - b1) * (g - m)
  v = v * b2 + (1.0 - b2) * g * g
  decayed = rounded_alone(p * decay, zero)
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
    if self.concat:
      leaves, tdef = jax.tree.flatten(params)
      layout = moments_layout(params, tdef.flatten_up_to(
          self.labels_fn(params)))
      dtype = jnp.result_type(*leaves) if leaves else jnp.float32
      zeros = lambda: FlatMoments(  # noqa: E731  (new buffers per call)
          [jnp.zeros((sum(math.prod(s) for _, s in items),), dtype)
           for _, items in layout], layout)
    else:
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
    groups = self._groups(labels)
    flat = isinstance(state.mu, FlatMoments)
    if flat != self.concat:
      raise ValueError(f'FlatAdamW(concat={self.concat}) was given a state '
                       f'with {"flat" if flat else "per-parameter"} moments')
    if flat:
      want = moments_layout(params, labels)
      if state.mu.layout != want:
        raise ValueError('FlatAdamW: the optimiser state was made for other '
                         'parameters (its moments layout differs)')
    else:
      mu_leaves = tdef.flatten_up_to(state.mu)
      nu_leaves = tdef.flatten_up_to(state.nu)

    def join(leaves, idx):
      if len(idx) == 1 and not flat:
        return leaves[idx[0]]
      return jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])

    g_vec = [join(g_leaves, idx) for _, idx in groups]
    sq = [jnp.sum(jnp.square(v.astype(jnp.float32))) for v in g_vec]
    norm = jnp.sqrt(sum(sq)) if sq else jnp.zeros((), jnp.float32)
    if self.max_norm > 0:
      # torch clip_grad_norm_: g * min(1, max / (norm + 1e-6)), rounded.
      coef = jnp.minimum(1.0, self.max_norm / (norm + 1e-6))
      g_vec = [(v * coef).astype(v.dtype) for v in g_vec]
    if flat:
      moments = (list(state.mu.vectors), list(state.nu.vectors))
    else:
      moments = ([join(mu_leaves, idx) for _, idx in groups],
                 [join(nu_leaves, idx) for _, idx in groups])
    carry = ([join(p_leaves, idx) for _, idx in groups],) + moments
    lrs = self.group_lrs(state.count)
    bc1, bc2_sqrt = bias_corrections(state.count, b1=self.b1, b2=self.b2)
    kw = dict(bc2_sqrt=bc2_sqrt, zero=opaque_zero(state.count),
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

    new_p = list(p_leaves)
    if flat:
      new_mu = FlatMoments(ms, state.mu.layout)
      new_nu = FlatMoments(vs, state.nu.layout)
    else:
      mu_out, nu_out = list(mu_leaves), list(nu_leaves)
    for (_, idx), pv, mv, vv in zip(groups, ps, ms, vs):
      if len(idx) == 1 and not flat:
        new_p[idx[0]], mu_out[idx[0]], nu_out[idx[0]] = pv, mv, vv
        continue
      off = 0
      for i in idx:
        n, shape = p_leaves[i].size, p_leaves[i].shape
        new_p[i] = pv[off:off + n].reshape(shape)
        off += n
    if not flat:
      new_mu, new_nu = tdef.unflatten(mu_out), tdef.unflatten(nu_out)
    lrs = {lr_metric_name(g): jnp.where(applied, v, state.lrs[
        lr_metric_name(g)]) for g, v in lrs.items()}
    new_state = FlatAdamWState(count=count, mu=new_mu, nu=new_nu, lrs=lrs)
    return tdef.unflatten(new_p), new_state, dict(grad_norm=norm,
                                                  applied=applied)

  def update(self, grads, state, params):
    """optax-style: (updates = new params - params, new state)."""
    new_params, new_state, _ = self.step(grads, state, params)
    return jax.tree.map(lambda n, p: n - p, new_params, params), new_state
