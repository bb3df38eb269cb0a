"""The train step: one jax.jit with explicit shardings and a donated state.

Mixed precision (``ddq_jax/precision.py``, config ``train.compute_dtype``):
``compute_dtype='bfloat16'`` casts the parameters and the images inside the
differentiated function; master parameters, gradients, optimiser state and
the loss stay float32 (the criterion reads its inputs in float32).

``loss_fn(params, batch_stats, batch, rng) -> (loss, metrics)`` takes the
*global* batch (jit works on global arrays).  The training objective on a
mesh with several devices on 'data' (``objective.make_loss_fn(mesh=...)``)
computes each device's loss on its own images inside a ``shard_map``, as
the reference's DDP does per GPU, and returns the devices' mean: the
gradient is DDP's mean of per-device gradients, its all-reduce the sum of
the replicated parameters' cotangents at the shard_map's boundary.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from orbax.checkpoint import multihost as ocp_multihost

from ddq_jax.precision import Precision
from ddq_jax.train.parallel import sharding as shd
from ddq_jax.train.optimizer import current_lrs
from ddq_jax.train.state import TrainState

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]
# Batch entries cast to the compute dtype (the rest keep theirs).
_CAST_BATCH_KEYS = ('images',)


def make_train_step(loss_fn: LossFn, tx, *,
                    compute_dtype: str | jnp.dtype = 'float32'):
  """Returns ``train_step(state, batch) -> (state, metrics)`` (not jitted).

  compute_dtype='bfloat16' casts params (and ``images``) to bf16 inside the
  differentiated function: master params, gradients and optimiser state stay
  float32.  metrics gain 'loss', 'grad_norm' (before clipping), 'lr',
  'lr_backbone' and 'nonfinite' (1.0 when the loss or the gradient norm is
  not finite: that step's update is not applied, params and optimiser state
  stay as they were; the loop counts and stops).
  """
  precision = Precision(compute_dtype=str(jnp.dtype(compute_dtype)))

  def train_step(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(state.rng)

    def objective(params):
      b = batch
      if precision.mixed:
        params = precision.cast(params)
        b = dict(batch)
        for k in _CAST_BATCH_KEYS:
          if k in b:
            b[k] = b[k].astype(precision.dtype)
      loss, metrics = loss_fn(params, state.batch_stats, b, step_rng)
      return loss.astype(jnp.float32), metrics

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    metrics = dict(metrics)
    metrics['loss'] = loss
    # The update is skipped (params and optimiser state stay bit for bit)
    # when the loss or the gradient norm is not finite.
    params, opt_state, info = tx.step(grads, state.opt_state, state.params,
                                      ok=jnp.isfinite(loss))
    metrics['grad_norm'] = info['grad_norm']
    metrics['nonfinite'] = 1.0 - info['applied'].astype(jnp.float32)
    metrics.update(current_lrs(opt_state))
    metrics = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, rng=rng)
    return new_state, metrics

  return train_step


def jit_train_step(train_step, mesh: Mesh, state_shardings: TrainState, *,
                   donate: bool = True):
  """jax.jit with in (state, batch on 'data') / out (state, replicated
  metrics) shardings; the input state is donated.
  ``compilation_cache.compile_count`` counts its compilations."""
  return jax.jit(
      train_step,
      in_shardings=(state_shardings, shd.batch_sharding(mesh)),
      out_shardings=(state_shardings, shd.replicated(mesh)),
      donate_argnums=(0,) if donate else ())


# How long a process waits for the others to finish compiling a step.
COMPILE_BARRIER_TIMEOUT_S = 3 * 3600


class CompiledSteps:
  """A jitted step, compiled ahead of its first call for each batch
  signature (shapes and dtypes), called through the compiled executable.

  With several processes, each waits at a barrier of the coordination
  service after compiling, so that none enters the step's first collective
  while another still compiles: CPU (gloo) collectives give up after 30 s,
  and two processes on one host compile at different speeds.
  ``compile_count`` is the number of executables.
  """

  def __init__(self, jitted):
    self.jitted = jitted
    self._compiled: dict = {}

  @staticmethod
  def signature(batch: dict) -> tuple:
    """A batch's (key, shape, dtype) entries: one executable per value."""
    return tuple((k, tuple(v.shape), str(v.dtype))
                 for k, v in sorted(batch.items()))

  def add(self, batch: dict, compiled) -> None:
    """Uses ``compiled`` (this step, compiled elsewhere, e.g. by
    ``memory_plan``) for batches of ``batch``'s signature."""
    self._compiled[self.signature(batch)] = compiled

  def __call__(self, state, batch):
    key = self.signature(batch)
    fn = self._compiled.get(key)
    if fn is None:
      fn = self.jitted.lower(state, batch).compile()
      if jax.process_count() > 1:
        ocp_multihost.sync_global_processes(
            f'ddq_train_step_compiled_{len(self._compiled)}',
            timeout=COMPILE_BARRIER_TIMEOUT_S)
      self._compiled[key] = fn
    return fn(state, batch)

  def compile_count(self) -> int:
    return len(self._compiled)
