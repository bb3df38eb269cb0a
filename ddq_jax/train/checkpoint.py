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
reads the slices it owns).  The optimiser's moments are always stored per
parameter (``canonical_state``), whether the state holds them that way or as
one vector per lr group (``flat_optimizer.FlatMoments``): either layout
restores from the same checkpoint.

Trust: the directory is checked (a directory, writable) when the
Checkpointer is made, so a bad path fails the run at once; a save that
fails raises ``CheckpointError`` (never a silent skip); a state with a
non-finite float is never saved; ``meta`` records a checksum of every array
(``integrity.state_fingerprint``) and ``restore`` verifies it.
``restore_latest_good`` walks back from the newest checkpoint: one that is
damaged (checksum mismatch, truncated or missing files, unreadable
metadata, non-finite values) is reported by step, moved aside into
``<dir>.damaged/`` (never deleted) and the next older one is tried.
"""
from __future__ import annotations

import logging
import os
import time

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from ddq_jax.io.conversion.mapping import stack_layers
from ddq_jax.train import checkpoint_layout
from ddq_jax.train import integrity
from ddq_jax.train.flat_optimizer import canonical_opt_state
from ddq_jax.train.flat_optimizer import from_canonical_opt_state
from ddq_jax.train.state import TrainState
from ddq_jax.tree_paths import leaf_paths

log = logging.getLogger(__name__)

_config_json = integrity.config_to_dict


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or no checkpoint could be read."""


class DamagedCheckpointError(CheckpointError):
  """One step's checkpoint is unreadable or fails its checksum."""

  def __init__(self, step: int, reason: str):
    super().__init__(f'checkpoint step {step}: {reason}')
    self.step, self.reason = step, reason


class StateMismatchError(CheckpointError):
  """An intact checkpoint whose arrays do not fit the target state (another
  model / optimiser configuration): not damage, nothing is moved."""


def canonical_state(state: TrainState) -> TrainState:
  """``state`` in the checkpoint layout (moments per parameter); arrays or
  ``jax.ShapeDtypeStruct`` leaves."""
  return state.replace(opt_state=canonical_opt_state(state.opt_state,
                                                     state.params))


def from_canonical_state(canonical: TrainState, target: TrainState
                         ) -> TrainState:
  """A restored checkpoint-layout state in ``target``'s layout and
  placement."""
  return canonical.replace(opt_state=from_canonical_opt_state(
      canonical.opt_state, target.opt_state))


def array_specs(tree) -> dict[str, list]:
  """{leaf path: [shape, dtype name]} of a pytree of arrays / structs."""
  return {p: [list(x.shape), str(x.dtype)] for p, x in
          zip(leaf_paths(tree), jax.tree.leaves(tree))}


def check_directory(directory: str) -> None:
  """Creates ``directory`` if absent and checks it is a writable directory.

  Raises:
    CheckpointError naming the path and what is wrong with it.
  """
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise CheckpointError(
        f'{directory} exists and is not a directory: checkpoints cannot be '
        'written there (move it away or choose another workdir)')
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f'.write-probe-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f'checkpoint directory {directory} is not '
                          f'writable: {e}') from None


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
    check_directory(self.directory)
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
    save.  A state with a non-finite float is not saved (logged, False).

    Raises:
      CheckpointError: this save, or an earlier asynchronous one, failed.
    """
    if step is None:
      step = int(jax.device_get(state.step))
    if not force and step % self.save_every:
      return False
    if step == self._last_saved or step in self.all_steps():
      return False
    state = canonical_state(state)
    checksums, finite = integrity.state_fingerprint(state)
    if not finite:
      log.error('checkpoint: step %d NOT saved: the state holds non-finite '
                'values (the newest finite checkpoint is kept)', step)
      return False
    meta = {'step': step, 'data_position': step,
            'process_count': jax.process_count(),
            'config': _config_json(config),
            'checksum_algo': integrity.CHECKSUM_ALGO, 'checksums': checksums,
            'arrays': array_specs(state)}
    if extra:
      meta.update(extra)
    try:
      saved = self._mngr.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
          force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'saving checkpoint step {step} to '
                            f'{self.directory} failed: {e}') from e
    if saved:
      self._last_saved = step
      log.info('checkpoint: saving step %d to %s', step, self.directory)
    return bool(saved)

  def wait(self) -> None:
    """Blocks until pending async saves are committed.

    Raises:
      CheckpointError: a pending save failed.
    """
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'writing checkpoint step {self._last_saved} to '
                            f'{self.directory} failed: {e}') from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mngr.close()

  # ---- reading ----------------------------------------------------------
  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def read_meta(self, step: int) -> dict:
    """The ``meta`` JSON of ``step`` (no arrays read)."""
    out = self._mngr.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out['meta'])

  def restore(self, target: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict]:
    """Restores into ``target``'s structure, dtypes and shardings and checks
    the recorded checksums.

    Args:
      target: a TrainState whose leaves are ``jax.ShapeDtypeStruct`` with a
        ``sharding`` or live arrays (their shardings are used).
      step: default the latest.

    Returns:
      (state, meta).
    Raises:
      FileNotFoundError: no checkpoint.
      DamagedCheckpointError: unreadable, checksum mismatch, non-finite.
      StateMismatchError: intact, but its arrays' paths / shapes / dtypes
        are not the target's.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    abstract = canonical_state(target)
    try:
      saved = self.read_meta(step).get('arrays')
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          step, f'metadata unreadable ({type(e).__name__})') from e
    legacy = None  # the per-layer layout of a checkpoint from before stacking
    if saved is not None:
      want = array_specs(abstract)
      diff = sorted(k for k in set(saved) | set(want)
                    if saved.get(k) != want.get(k))
      if diff:
        old_layout = checkpoint_layout.per_layer(
            abstract, jax.tree.leaves(target)[0].sharding)
        if array_specs(old_layout) == saved:
          legacy = old_layout
        else:
          shown = '; '.join(f'{k}: {saved.get(k, "absent")} saved, '
                            f'{want.get(k, "absent")} expected'
                            for k in diff[:4])
          raise StateMismatchError(
              f'checkpoint step {step} in {self.directory} is intact but '
              f'holds another state: {len(diff)} arrays differ ({shown}); '
              'was it written with another model / optimiser config?')
    try:
      out = self._mngr.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(
                  abstract if legacy is None else legacy),
              meta=ocp.args.JsonRestore()))
      state, meta = out['state'], dict(out['meta'])
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0] if str(e).strip() else ''
      raise DamagedCheckpointError(
          step, f'unreadable ({type(e).__name__}: {first[:200]})') from e
    checksums, finite = integrity.state_fingerprint(state)
    if 'checksums' in meta:
      bad = integrity.checksum_mismatches(meta['checksums'], checksums)
      if bad:
        raise DamagedCheckpointError(
            step, f'checksum mismatch in {len(bad)} arrays '
            f'(first: {", ".join(bad[:3])})')
    else:
      log.warning('checkpoint step %d has no checksums (written by an older '
                  'version): not verified', step)
    if not finite:
      raise DamagedCheckpointError(step, 'holds non-finite values')
    if legacy is not None:
      state = checkpoint_layout.stacked(state, abstract)
      log.warning('checkpoint step %d holds identical layers per layer (an '
                  'older version): stacked into the current layout; the '
                  'next checkpoint is written stacked', step)
    log.info('checkpoint: restored step %d from %s (checksums verified)',
             step, self.directory)
    return from_canonical_state(state, target), meta

  def set_aside(self, step: int) -> str:
    """Moves step ``step``'s directory into ``<dir>.damaged/`` (process 0;
    nothing is deleted) and returns where it went."""
    src = os.path.join(self.directory, str(step))
    dst_dir = self.directory + '.damaged'
    dst = os.path.join(dst_dir, f'{step}-{time.strftime("%Y%m%dT%H%M%S")}')
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(dst_dir, exist_ok=True)
      while os.path.exists(dst):
        dst += '+'
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'ddq_set_aside_{step}')
    self._mngr.reload()
    return dst

  def restore_latest_good(self, target: TrainState
                          ) -> tuple[TrainState, dict | None]:
    """Restores the newest checkpoint that reads and verifies.

    Each damaged newer checkpoint is logged by step with the reason and
    moved aside (``set_aside``).  Returns (target, None) when there is no
    checkpoint at all.

    Raises:
      CheckpointError: checkpoints exist but none is intact.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return target, None
    damaged = []
    for step in steps:
      try:
        return self.restore(target, step)
      except DamagedCheckpointError as e:
        where = self.set_aside(step)
        log.error('%s in %s: moved to %s; trying the previous checkpoint',
                  e, self.directory, where)
        damaged.append(str(e))
    raise CheckpointError(
        f'no intact checkpoint in {self.directory} (all moved to '
        f'{self.directory}.damaged/): ' + '; '.join(damaged))


def load_params_only(directory: str, step: int | None = None) -> dict:
  """{'params', 'batch_stats'} (numpy) of a TrainState checkpoint, without
  the optimiser state (e.g. for evaluation / fine-tuning), in the stacked
  layout (``mapping.stack_layers``: a run saved per layer loads too).

  Their checksums are verified; with ``step`` None a damaged newest
  checkpoint is reported and the next older one is read (nothing is moved:
  the directory may be another run's).

  Raises:
    CheckpointError: no checkpoint, or none intact.
  """
  mngr = ocp.CheckpointManager(os.path.abspath(directory),
                               item_names=('state', 'meta'))
  steps = ([step] if step is not None else
           sorted(mngr.all_steps(), reverse=True))
  if not steps:
    raise CheckpointError(f'no checkpoint in {directory}')
  problems = []
  for s in steps:
    try:
      restored = mngr.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
      st = restored['state']
      get = ((lambda k: st[k]) if isinstance(st, dict) else
             (lambda k: getattr(st, k)))  # pylint: disable=cell-var-from-loop
      out = {'params': jax.device_get(get('params')),
             'batch_stats': jax.device_get(get('batch_stats'))}
      expected = {k: v for k, v in dict(restored['meta']).get(
          'checksums', {}).items() if k.startswith(('params/',
                                                    'batch_stats/'))}
      if expected:
        got, _ = integrity.state_fingerprint(out)
        bad = integrity.checksum_mismatches(expected, got)
        if bad:
          raise DamagedCheckpointError(
              s, f'checksum mismatch in {len(bad)} arrays (first: '
              f'{", ".join(bad[:3])})')
      if not integrity.host_all_finite(out):
        raise DamagedCheckpointError(s, 'holds non-finite values')
      # A run from before layers were stored stacked: converted here, once.
      return stack_layers(out)
    except Exception as e:  # pylint: disable=broad-except
      msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
      log.error('checkpoint step %d in %s is damaged (%s: %s)%s', s,
                directory, type(e).__name__, msg,
                '; trying the previous one' if s != steps[-1] else '')
      problems.append(f'step {s}: {msg}')
  raise CheckpointError(f'no intact checkpoint in {directory}: '
                        + '; '.join(problems))
