"""The training loop: data -> sharded step -> logs / checkpoints / eval.

    train(config, workdir)                    # the real DDQ-DETR
    train(config, workdir, components=Components(init_variables, loss_fn,
          make_iterator=...))               # any model (tests)

Per run: ``workdir/config.json``, ``workdir/checkpoints/<step>/`` (orbax,
async, keeps ``train.keep_checkpoints``), ``workdir/tb/`` (tensorboardX
scalars and images, process 0), ``workdir/drawings/step_<N>/*.png`` (at
each evaluation, the detections on ``eval.num_drawn_images`` held-out
images at scores >= ``eval.draw_score_threshold``; also in TensorBoard).  A run resumes from its latest checkpoint (state +
data position), else initialises from ``train.init_from`` (a converted
weights directory, an mmdetection .pth, a torchvision ResNet .pth, or
another run's checkpoint directory), else from scratch.  SIGINT / SIGTERM
stop the loop at the next step boundary after saving a checkpoint.

Faults (nothing lost, nothing silently wrong):
  * a resume whose config differs from the checkpoint's (outside
    ``integrity.RESUME_MAY_CHANGE`` and ``train.resume_may_change``) stops
    before anything is written, naming the keys (ConfigMismatchError);
  * the newest checkpoint damaged -> reported by step, moved aside, the
    newest intact one is used (checkpoint.restore_latest_good);
  * a step with a non-finite loss / gradient is not applied; after
    ``train.max_nonfinite_steps`` in a row the run stops (NonFiniteError)
    keeping the last finite checkpoint; ``train.inject_nan_at_steps``
    poisons the images of those steps (a test hook);
  * a failed save raises CheckpointError, a failed log write (disk full)
    OutputWriteError;
  * the workdir is locked for the run (``training.workdir``): a second run
    on it, a converted-weights folder or a folder of other files stop at
    once (WorkdirError); an ``init_from`` that cannot be read or does not
    fit the model stops before training (InitFromError).
Exit codes of train.py (``exit_code_for``): 0 finished, EXIT_PREEMPTED (143
= 128 + SIGTERM) or 130 (SIGINT) stopped by a signal after its checkpoint,
EXIT_CONFIG_MISMATCH (2: also a bad config value, workdir or init_from),
EXIT_NONFINITE (3), EXIT_CHECKPOINT (4: a checkpoint or log not written).
Per-step scalars also go to ``workdir/metrics.jsonl`` (one JSON per line).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from ddq_jax.compilation_cache import compile_count
from ddq_jax.data.pipeline import build_dataset, make_train_iterator
from ddq_jax.evaluation.evaluator import evaluate_model
from ddq_jax.io.weights import load_pretrained
from ddq_jax.model.detector import build_model
from ddq_jax.model.variables import init_variables
from ddq_jax.serve.detect import jit_detect_fn
from ddq_jax.serve.drawing import draw_eval_images
from ddq_jax.train import checkpoint as ckpt_lib
from ddq_jax.train import memory_plan
from ddq_jax.train import nonfinite
from ddq_jax.train import optimizer as opt_lib
from ddq_jax.train import state as state_lib
from ddq_jax.train import step as step_lib
from ddq_jax.train import workdir as workdir_lib
from ddq_jax.train.objective import make_loss_fn
from ddq_jax.train.parallel import mesh as mesh_lib
from ddq_jax.train.parallel import sharding as shd
from ddq_jax.train.run_log import OutputWriteError, RunLogger
from ddq_jax.train.run_checks import (  # noqa: F401  (loop.X for callers)
    EXIT_CHECKPOINT, EXIT_CONFIG_MISMATCH, EXIT_INTERRUPTED, EXIT_NONFINITE,
    EXIT_PREEMPTED, ConfigMismatchError, InitFromError, TrainConfigError,
    check_resume_config, check_train_config, exit_code_for)
from ddq_jax.train.stop_signal import StopSignal

log = logging.getLogger('ddq_jax.train')

# Batch entries the train step consumes (image_ids etc. stay on the host).
TRAIN_KEYS = ('images', 'pad_mask', 'img_shapes', 'scale_factors', 'gt_boxes',
              'gt_labels', 'gt_valid', 'sample_valid')

@dataclasses.dataclass
class Components:
  """What the loop needs from the model side.

  init_variables: rng -> {'params', 'batch_stats'}.
  loss_fn: (params, batch_stats, batch, rng) -> (loss, metrics).
  make_iterator: (start_step, process_index, process_count) -> iterator of
    host batches with ``.steps_per_epoch`` (and ideally ``set_state``).
  evaluate_fn: optional (state) -> {name: float}, or ({name: float},
    drawings): drawings [(name, (h, w, 3) uint8 RGB)] are written to
    ``workdir/drawings/step_<N>/<name>.png`` and TensorBoard.
  """
  init_variables: Callable[[jax.Array], dict]
  loss_fn: Callable
  make_iterator: Callable[[int, int, int], Iterator[dict]]
  evaluate_fn: Optional[Callable[[Any], dict]] = None


def default_components(config, *, mesh=None) -> Components:
  """The real model (models.detector), objective (training.objective), data
  (data.pipeline) and, when importable, evaluation, for a step on ``mesh``
  (default: one device)."""

  model = build_model(config)
  seed = int(config.train.seed)
  dataset = build_dataset(config, config.data.train_split)

  def make_iterator(start_step, process_index, process_count):
    return make_train_iterator(config, seed=seed, start_step=start_step,
                               process_index=process_index,
                               process_count=process_count, dataset=dataset)

  return Components(
      init_variables=lambda rng: init_variables(model, config, rng),
      loss_fn=make_loss_fn(model, config, mesh=mesh),
      make_iterator=make_iterator,
      evaluate_fn=default_evaluate_fn(config, mesh=mesh))


def default_evaluate_fn(config, *, mesh=None) -> Callable:
  """COCO evaluation via ddq_jax.evaluation, through the inference program
  of ``evaluate`` / ``predict`` / ``export`` (``serve.detect``).  It runs
  on the training ``mesh`` and reads the state's parameters with their
  training shardings (nothing is re-replicated).  Returns (metrics,
  drawings): the detections of the first ``eval.num_drawn_images``
  evaluated images (``serve.drawing.draw_eval_images``)."""
  cache = {}
  num_drawn = int(config.eval.num_drawn_images)
  threshold = float(config.eval.draw_score_threshold)

  def evaluate(state):
    if 'detect' not in cache:
      cache['detect'] = jit_detect_fn(config)
      cache['source'] = build_dataset(config, config.data.eval_split)
    metrics, detections = evaluate_model(
        cache['detect'], {'params': state.params,
                          'batch_stats': state.batch_stats},
        cache['source'], config=config, mesh=mesh, progress=False,
        max_images=int(config.eval.max_images) or None)
    drawings = []
    if num_drawn > 0 and jax.process_index() == 0:
      drawings = draw_eval_images(cache['source'], detections,
                                  image_ids=metrics['image_ids'][:num_drawn],
                                  score_threshold=threshold)
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.floating, np.integer))}, drawings
  return evaluate


# -------------------------------------------------------------------- loop
def _total_steps(config, steps_per_epoch: int) -> int:
  if int(config.train.max_steps) > 0:
    return int(config.train.max_steps)
  return int(config.optim.epochs) * steps_per_epoch


def _write_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  text = config.to_json_best_effort(indent=2) if hasattr(
      config, 'to_json_best_effort') else json.dumps(config, indent=2)
  tmp = os.path.join(workdir, 'config.json.tmp')
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, os.path.join(workdir, 'config.json'))
  except OSError as e:
    raise OutputWriteError(e.errno, f'cannot write config.json in {workdir}: '
                           f'{e.strerror or e}') from None


def train(config, workdir: str, *, components: Optional[Components] = None,
          devices=None) -> dict:
  """Trains until ``train.max_steps`` (or ``optim.epochs``) or a stop
  signal.  Returns {'step', 'last_metrics', 'eval', 'compiles', 'stopped',
  'signal', 'nonfinite_steps'} (``exit_code_for(result=...)`` maps it).
  The workdir is checked and locked first (``training.workdir``).

  Raises:
    TrainConfigError, workdir.WorkdirError, ConfigMismatchError,
    InitFromError, nonfinite.NonFiniteError, checkpoint.CheckpointError,
    OutputWriteError (see the module docstring; ``exit_code_for(error)``).
  """
  workdir = os.path.abspath(workdir)
  check_train_config(config)
  workdir_lib.check_workdir(workdir)
  with workdir_lib.hold(workdir, enabled=jax.process_index() == 0):
    return _train(config, workdir, components=components, devices=devices)


def _init_from(state, config, tx):
  """The state with ``train.init_from``'s weights; InitFromError (one line)
  when they cannot be read or do not fit."""
  path = config.train.init_from
  try:
    loaded = load_pretrained(path, config)
    state, report = state_lib.merge_variables(state, loaded, tx)
  except (OSError, ValueError, KeyError, ckpt_lib.CheckpointError) as e:
    log.debug('init_from %s failed', path, exc_info=True)
    raise InitFromError(f'--config.train.init_from={path}: '
                        f'{" ".join(str(e).split())}') from None
  log.info('init_from %s: %d arrays loaded, %d left at init, %d unused',
           path, report['loaded'], len(report['missing']),
           len(report['unexpected']))
  return state


def _open_checkpoints(config, workdir: str) -> ckpt_lib.Checkpointer:
  """The run's checkpoints, checked usable (and a resume's config
  matching) before anything is written; then the workdir's config.json."""
  ckpt = ckpt_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      save_every=int(config.train.checkpoint_every),
      keep=int(config.train.keep_checkpoints) or None)
  check_resume_config(ckpt, config)
  _write_config(config, workdir)
  return ckpt


def _check_parallel_setup(config, comps: Components, mesh) -> None:
  """Logs the matching solver (a warning for host callbacks on many
  devices); checks the global batch divides over the mesh."""
  if hasattr(comps.loss_fn, 'criterion_config'):
    log.info('Hungarian solver: %s', comps.loss_fn.criterion_config.solver)
  if (mesh.devices.size > 1 and
      config.loss.hungarian_solver == 'scipy'):
    log.warning("loss.hungarian_solver='scipy' on %d devices: each device "
                'waits for a host callback every step; '
                "'jax' keeps matching on the device", mesh.devices.size)
  shd.local_batch_size(int(config.train.global_batch_size), mesh)


def _steps_per_epoch(data, config) -> int:
  spe = int(getattr(data, 'steps_per_epoch', 0) or
            config.train.steps_per_epoch)
  if spe <= 0:
    raise ValueError('the data iterator has no steps_per_epoch')
  return spe


def _initial_state(config, comps: Components, tx, mesh,
                   ckpt: ckpt_lib.Checkpointer):
  """(state, shardings, first step): the newest good checkpoint's, else a
  fresh initialisation (with ``train.init_from``'s weights)."""
  rng = jax.random.PRNGKey(int(config.train.seed))
  rules, min_size = shd.rules_from_config(config)
  state, shardings = state_lib.init_train_state(
      comps.init_variables, tx, rng, mesh, min_size=min_size, rules=rules)
  start = 0
  state, meta = ckpt.restore_latest_good(state)
  if meta is not None:
    start = int(meta['data_position'])
    log.info('resumed from step %d', start)
  elif config.train.init_from:
    state = _init_from(state, config, tx)
  return state, shardings, start


def _window_metrics(pending: list, *, step: int, guard, seconds: float,
                    global_batch: int, steps_per_epoch: int) -> dict:
  """The logged metrics of the steps since the last log: means over the
  finite steps (all, when none is), non-finite count, images/s, epoch."""
  host_m = [shd.to_host(m) for m in pending]
  for i, m in enumerate(host_m):
    guard.observe(step - len(host_m) + 1 + i, m)
  good = [m for m in host_m if not m.get('nonfinite', 0.0)] or host_m
  last = {k: float(np.mean([m[k] for m in good])) for k in good[0]}
  last['nonfinite_steps'] = float(len(host_m) - len(good))
  last['images_per_s'] = len(pending) * global_batch / max(seconds, 1e-9)
  last['epoch'] = step / steps_per_epoch
  return last


def _log_window(logger: RunLogger, last: dict, *, step: int, steps: int,
                schedule) -> None:
  """The window's metrics to the run log and the progress line."""
  logger.scalars(step, last)
  logger.update(steps, {
      'loss': f"{last['loss']:.4f}",
      'lr': f"{last.get('lr', float(schedule(step - 1))):.2e}",
      'img/s': f"{last['images_per_s']:.1f}"})


def _evaluate(comps: Components, state, step: int, logger: RunLogger, *,
              previous: dict) -> dict:
  """The periodic evaluation's metrics (logged, with its drawings);
  ``previous`` without an evaluation."""
  if comps.evaluate_fn is None:
    return previous
  out = comps.evaluate_fn(state)
  metrics, drawings = out if isinstance(out, tuple) else (out, [])
  logger.scalars(step, metrics, prefix='eval/')
  logger.images(step, drawings)
  if jax.process_index() == 0:
    log.info('eval at step %d: %s', step, metrics)
  return metrics


def _close_run(ckpt, state, *, step: int, config, failed, data,
               logger) -> None:
  """The final checkpoint (unless the run failed on non-finite steps or
  its checkpoints), then the data and, after a failure, the log and
  checkpointer; an error here does not hide the run's own."""
  try:
    if not isinstance(failed, (nonfinite.NonFiniteError,
                               ckpt_lib.CheckpointError)):
      ckpt.save(state, step=step, config=config, force=True)
    ckpt.wait()
  except Exception as e:  # pylint: disable=broad-except
    if failed is None:
      raise
    # a step that raised may have consumed (donated) the state; the
    # original error propagates
    log.warning('final checkpoint failed too: %s', e)
  finally:
    if hasattr(data, 'close'):
      data.close()
    if failed is not None:
      logger.close(quiet=True)
      try:
        ckpt.close()
      except Exception:  # pylint: disable=broad-except
        pass


def _compiled_steps(config, comps: Components, data, *, state, tx, mesh,
                    shardings, planned_components: bool):
  """(config, the step as ``CompiledSteps``, the batch the memory plan drew
  from ``data`` or None).  Under ``train.memory=auto`` the plan picks the
  step's layout from the first batch and its step is kept compiled."""
  loss_fn, first_host, planned = comps.loss_fn, None, None
  if memory_plan.memory_mode(config) == 'auto':
    if not planned_components:
      log.warning('train.memory=auto plans the real model only: these '
                  'components run as configured')
    else:
      first_host = {k: v for k, v in next(data).items() if k in TRAIN_KEYS}
      config, loss_fn, planned, _ = memory_plan.plan_train_step(
          config, host_batch=first_host, state=state, tx=tx, mesh=mesh,
          shardings=shardings)
  step_fn = step_lib.CompiledSteps(step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, tx,
                               compute_dtype=config.train.compute_dtype),
      mesh, shardings))
  if planned is not None:
    step_fn.add(memory_plan.largest_canvas_batch(first_host, config, mesh),
                planned)
  return config, step_fn, first_host


def _train(config, workdir: str, *, components, devices) -> dict:
  mesh = mesh_lib.make_mesh(config, devices)
  ckpt = _open_checkpoints(config, workdir)
  comps = components or default_components(config, mesh=mesh)
  pidx, pcount = jax.process_index(), jax.process_count()
  gbs = int(config.train.global_batch_size)
  _check_parallel_setup(config, comps, mesh)

  data = comps.make_iterator(0, pidx, pcount)
  spe = _steps_per_epoch(data, config)
  total = _total_steps(config, spe)
  tx, schedule = opt_lib.make_optimizer(config, spe)
  state, shardings, start = _initial_state(config, comps, tx, mesh, ckpt)
  if start:
    if hasattr(data, 'set_state'):
      data.set_state({'step': start})
    else:
      data = comps.make_iterator(start, pidx, pcount)

  config, step_fn, first_host = _compiled_steps(
      config, comps, data, state=state, tx=tx, mesh=mesh, shardings=shardings,
      planned_components=components is None)
  log_every = max(int(config.train.log_every), 1)
  eval_every = int(config.train.eval_every)
  eval_every = spe if eval_every == -1 else eval_every
  logger = RunLogger(workdir, total, start)
  pending, last, eval_metrics, stopped = [], {}, {}, False
  t_log = time.time()
  guard = nonfinite.NonFiniteGuard(int(config.train.max_nonfinite_steps))
  poison = {int(k) for k in config.train.inject_nan_at_steps}

  with StopSignal() as stop:
    step = start
    failed = None
    try:
      while step < total:
        host, first_host = (first_host if first_host is not None
                            else next(data)), None
        if step in poison:  # test hook: a NaN input at this step
          host = dict(host, images=np.full_like(host['images'], np.nan))
        batch = shd.shard_batch({k: host[k] for k in TRAIN_KEYS if k in host},
                                mesh)
        state, metrics = step_fn(state, batch)
        step += 1
        pending.append(metrics)
        if step % log_every == 0 or step == total:
          last = _window_metrics(pending, step=step, guard=guard,
                                 seconds=time.time() - t_log,
                                 global_batch=gbs, steps_per_epoch=spe)
          _log_window(logger, last, step=step, steps=len(pending),
                      schedule=schedule)
          pending, t_log = [], time.time()
        ckpt.save(state, step=step, config=config)
        if eval_every > 0 and step % eval_every == 0 and step < total:
          eval_metrics = _evaluate(comps, state, step, logger,
                                 previous=eval_metrics)
        if (stop.agreed() if (pcount == 1 or step % log_every == 0)
            else False):
          stopped = True
          break
    except BaseException as e:
      failed = e
      raise
    finally:
      _close_run(ckpt, state, step=step, config=config, failed=failed,
                 data=data, logger=logger)
  if not stopped and eval_every != 0:
    eval_metrics = _evaluate(comps, state, step, logger,
                           previous=eval_metrics)
  ckpt.close()
  logger.close()
  result = {'step': step, 'last_metrics': last, 'eval': eval_metrics,
            'compiles': compile_count(step_fn), 'stopped': stopped,
            'signal': stop.signum if stopped else None,
            'nonfinite_steps': guard.total}
  if pidx == 0:
    log.info('done: %s', {k: v for k, v in result.items() if k != 'eval'})
  return result
