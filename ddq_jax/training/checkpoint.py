"""Checkpoints of the TrainState with orbax's CheckpointManager.

Layout: ``<dir>/<step>/{state, meta}``.  ``state`` is the whole TrainState
(step, params, batch_stats, opt_state, rng); ``meta`` is JSON with the step,
the data position (the data iterator is deterministic by step, so the step
is the position) and the config.  Saves are asynchronous (the train loop
goes on while a background thread writes), atomic (orbax writes into a
temporary directory and renames it when complete; an interrupted save leaves
no step directory behind), and the manager keeps the last ``keep``.

Restoring takes the target's abstract state with shardings, so a checkpoint
written under one mesh / process count restores into another (every process
reads the slices it owns).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ddq_jax.training.state import TrainState

log = logging.getLogger(__name__)


def _config_json(config) -> Any:
  if config is None:
    return None
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


class Checkpointer:
  """Wraps ``ocp.CheckpointManager`` for TrainStates.

  Args:
    directory: where the step directories go (created; absolute path made).
    save_every: ``save(state)`` writes only when step % save_every == 0
      (``force=True`` always writes).
    keep: how many recent checkpoints to keep (None: all).
    async_save: background writes (``wait()`` blocks until they are done).
  """

  def __init__(self, directory: str, *, save_every: int = 1,
               keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = max(int(save_every), 1)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save,
        # policy is ours (save_every / force): the manager saves when asked.
        save_interval_steps=1)
    self._last_saved = None
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'meta'))

  # ---- saving -----------------------------------------------------------
  def save(self, state: TrainState, *, step: int | None = None, config=None,
           extra: dict | None = None, force: bool = False) -> bool:
    """Starts an (async) save of ``state`` at its step; returns whether it
    did.  Every process must call it (multi-host).  Pass the host-side
    ``step`` (== state.step) to avoid a device sync on steps that do not
    save."""
    if step is None:
      step = int(jax.device_get(state.step))
    if not force and step % self.save_every:
      return False
    if step == self._last_saved or step in self.all_steps():
      return False
    meta = {'step': step, 'data_position': step,
            'process_count': jax.process_count(),
            'config': _config_json(config)}
    if extra:
      meta.update(extra)
    saved = self._mngr.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        force=True)
    if saved:
      self._last_saved = step
      log.info('checkpoint: saving step %d to %s', step, self.directory)
    return bool(saved)

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  # ---- reading ----------------------------------------------------------
  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def restore(self, target: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict]:
    """Restores into ``target``'s structure, dtypes and shardings.

    Args:
      target: a TrainState whose leaves are ``jax.ShapeDtypeStruct`` with a
        ``sharding`` or live arrays (their shardings are used).
      step: default the latest.

    Returns:
      (state, meta).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    out = self._mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    log.info('checkpoint: restored step %d from %s', step, self.directory)
    return out['state'], dict(out['meta'])


def load_params_only(directory: str, step: int | None = None) -> dict:
  """{'params', 'batch_stats'} (numpy) of a TrainState checkpoint, without
  the optimiser state (e.g. for evaluation / fine-tuning)."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory),
                               item_names=('state', 'meta'))
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  st = restored['state']
  get = (lambda k: st[k]) if isinstance(st, dict) else (lambda k: getattr(st, k))
  return {'params': jax.device_get(get('params')),
          'batch_stats': jax.device_get(get('batch_stats'))}
