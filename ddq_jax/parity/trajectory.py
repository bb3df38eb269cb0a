"""Several optimiser steps against the reference: ``verify BUNDLE --steps N``.

Runs N steps of the project's own training step (``training/step.py``'s
jitted ``train_step`` over ``training/objective.py``'s loss and
``training/optimizer.py``'s optimiser, exactly as ``train.py`` builds them)
on the bundle's fixed batch, from its converted checkpoint, and compares
the run with the reference's ``trajectory.npz`` when the bundle holds one.

Bundle: ``checkpoint.pth`` + ``inputs.npz`` (as ``verify``'s), optionally
``trajectory.npz`` (the reference's run: ``loss/<key>``, ``loss_total``,
``grad_global_norm`` per step, ``init/<name>`` and ``param/<name>``) and
``trajectory.json`` (its settings: lr, warm-up, denoising noise scales,
the mmengine ``optim_wrapper``).  When the checkpoint or the inputs are
not in the bundle, they are taken from the sibling folder named by
``trajectory.json``'s ``variant`` (``../tiny`` for ``tiny_trajectory``).

Settings applied to the config, in order: the checkpoint's own config (or
``--config``), then ``reference_order`` (no rematerialisation, no layer
scans), then ``trajectory.json`` (see ``settings_overrides``), then the
command line's ``--config.KEY=VALUE``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Mapping, Optional

import jax
import numpy as np

from ddq_jax.compilation_cache import compile_count
from ddq_jax.config import apply_overrides, load_config
from ddq_jax.io.conversion.converter import convert_checkpoint
from ddq_jax.io.conversion.export import to_reference_names
from ddq_jax.io.conversion.torch_pickle import (load_torch_checkpoint,
                                                state_dict_of)
from ddq_jax.model.denoising import dn_layout, noisy_dn_targets, num_dn_slots
from ddq_jax.model.detector import build_model
from ddq_jax.parity.compare import Comparison
from ddq_jax.parity.trajectory_compare import compare_history, compare_params, step_errors, ulp_summary
from ddq_jax.train import optimizer as opt_lib
from ddq_jax.train import state as state_lib
from ddq_jax.train import step as step_lib
from ddq_jax.train.loop import TRAIN_KEYS
from ddq_jax.train.objective import make_loss_fn
from ddq_jax.train.optimizer import FROZEN, param_labels
from ddq_jax.train.parallel import mesh as mesh_lib
from ddq_jax.train.parallel import sharding as shd

TRAJECTORY_NPZ = 'trajectory.npz'
TRAJECTORY_JSON = 'trajectory.json'


class TrajectoryInputError(ValueError):
  """Bad settings, overrides or step count (the message names them)."""


def reference_order(config) -> dict:
  """Overrides that run the training step in the reference's order of
  float32 operations: no rematerialisation and no layer scans.  Both give
  the same values up to float32 rounding (tests/test_remat.py), but at the
  fixture's learning rates one rounding step is already ~1e-3 of six steps'
  change for some parameters (measured: with them on,
  ``encoder.layers.0.self_attn.sampling_offsets.weight`` ends 2.0e-3 off
  instead of 6.2e-4).  ``--config.train.remat.encoder=full`` etc. put them
  back."""
  out = {'train.scan_layers': False}
  for part in config.train.remat.keys():
    out[f'train.remat.{part}'] = 'none'
  return out


# ------------------------------------------------------------ bundle / config
def bundle_files(bundle: str) -> dict:
  """Paths of the bundle's files and its settings.

  Returns {'checkpoint', 'inputs', 'trajectory' (or None), 'settings' (the
  parsed trajectory.json, {} if absent)}.
  Raises FileNotFoundError naming what is missing.
  """
  if not os.path.isdir(bundle):
    raise FileNotFoundError(f'{bundle}: not a directory (a bundle holds '
                            'checkpoint.pth and inputs.npz)')
  settings = {}
  json_path = os.path.join(bundle, TRAJECTORY_JSON)
  if os.path.isfile(json_path):
    with open(json_path) as f:
      settings = json.load(f)
  out = {'settings': settings}
  for key, name in (('checkpoint', 'checkpoint.pth'), ('inputs', 'inputs.npz')):
    candidates = [os.path.join(bundle, name)]
    if settings.get('variant'):
      candidates.append(os.path.join(os.path.dirname(os.path.abspath(bundle)),
                                     str(settings['variant']), name))
    found = [p for p in candidates if os.path.isfile(p)]
    if not found:
      raise FileNotFoundError(
          f'{candidates[0]}: missing (looked in {candidates}); a bundle holds '
          'checkpoint.pth and inputs.npz, or names in trajectory.json the '
          "sibling 'variant' folder that does")
    out[key] = found[0]
  traj = os.path.join(bundle, TRAJECTORY_NPZ)
  out['trajectory'] = traj if os.path.isfile(traj) else None
  return out


def settings_overrides(settings: Mapping) -> dict:
  """trajectory.json -> dotted config overrides.

  Reads ``lr``, ``warmup`` (null: none), ``dn_label_noise_scale``,
  ``dn_box_noise_scale`` and ``optim_wrapper`` (mmengine's: AdamW lr /
  weight_decay, clip_grad max_norm with norm_type 2, paramwise_cfg
  custom_keys {'backbone': {'lr_mult'}}).  The lr is constant over the run
  (no epoch milestones).  Anything the optimiser cannot express is a
  TrajectoryInputError naming it.
  """
  if not settings:
    return {}
  o = {'optim.decay_epochs': ()}
  wrapper = dict(settings.get('optim_wrapper') or {})
  opt = dict(wrapper.get('optimizer') or {})
  if opt:
    if opt.get('type') != 'AdamW':
      raise TrajectoryInputError(f"optim_wrapper.optimizer.type {opt.get('type')!r}: "
                       "only 'AdamW' is supported")
    if 'lr' in opt:
      o['optim.lr'] = float(opt['lr'])
    if 'weight_decay' in opt:
      o['optim.weight_decay'] = float(opt['weight_decay'])
  clip = wrapper.get('clip_grad')
  if clip:
    if int(clip.get('norm_type', 2)) != 2:
      raise TrajectoryInputError(f"clip_grad.norm_type {clip['norm_type']}: only 2 is "
                       'supported')
    o['optim.clip_norm'] = float(clip['max_norm'])
  elif 'clip_grad' in wrapper:
    o['optim.clip_norm'] = 0.0
  keys = dict((wrapper.get('paramwise_cfg') or {}).get('custom_keys') or {})
  for key, value in keys.items():
    if key != 'backbone' or set(value) - {'lr_mult'}:
      raise TrajectoryInputError(f'paramwise_cfg.custom_keys {key!r}: {value}: only '
                       "{'backbone': {'lr_mult': x}} is supported")
    o['optim.backbone_lr_mult'] = float(value['lr_mult'])
  if 'lr' in settings:
    o['optim.lr'] = float(settings['lr'])
  if settings.get('warmup'):
    raise TrajectoryInputError(f"warmup {settings['warmup']!r}: only null (no warm-up) "
                     'is supported')
  o['optim.warmup_steps'] = 0
  for src, dst in (('dn_label_noise_scale', 'dn.label_noise_scale'),
                   ('dn_box_noise_scale', 'dn.box_noise_scale')):
    if src in settings:
      o[dst] = float(settings[src])
  return o


def fixed_batch(inputs: Mapping) -> dict:
  """The bundle's batch in the training step's contract (no augmentation)."""
  return dict(images=np.asarray(inputs['images'], np.float32),
              pad_mask=np.asarray(inputs['pad_mask'], bool),
              img_shapes=np.asarray(inputs['img_shapes'], np.int32),
              scale_factors=np.asarray(inputs['scale_factors'], np.float32),
              gt_boxes=np.asarray(inputs['gt_boxes'], np.float32),
              gt_labels=np.asarray(inputs['gt_labels'], np.int32),
              gt_valid=np.asarray(inputs['gt_valid'], bool))


# ---------------------------------------------------------------- the run
def dn_noise_check(config, batch: Mapping, keys) -> dict:
  """Whether the denoising draws of these keys equal the ground truth.

  Runs the generator's own ``noisy_dn_targets`` with the config's noise
  scales and with zero noise (the ground truth itself, as the reference's
  queries are at scales 1e-12) on each key.
  Returns {'label_mismatches': int, 'box_max_abs': float} over all keys.
  """
  g = batch['gt_valid'].shape[1]
  layout = dn_layout(jax.numpy.asarray(batch['gt_valid']),
                     num_dn_queries=int(config.dn.num_dn_queries),
                     num_slots=num_dn_slots(
                         num_dn_queries=int(config.dn.num_dn_queries),
                         max_gt=g))
  common = dict(gt_boxes=batch['gt_boxes'], gt_labels=batch['gt_labels'],
                img_shapes=batch['img_shapes'], layout=layout,
                num_classes=int(config.num_classes))
  mismatches, box_err = 0, 0.0
  for key in keys:
    lab, box = noisy_dn_targets(
        key, label_noise_scale=float(config.dn.label_noise_scale),
        box_noise_scale=float(config.dn.box_noise_scale), **common)
    lab0, box0 = noisy_dn_targets(key, label_noise_scale=0.0,
                                  box_noise_scale=0.0, **common)
    mismatches += int(np.sum(np.asarray(lab) != np.asarray(lab0)))
    box_err = max(box_err, float(np.max(np.abs(np.asarray(box, np.float64)
                                               - np.asarray(box0)))))
  return {'label_mismatches': mismatches, 'box_max_abs': box_err}


def run_steps(model, config, variables: Mapping, batch: Mapping, *,
              steps: int, seed: int = 0,
              on_step: Optional[Callable[[int, dict, float], None]] = None
              ) -> dict:
  """N steps of the training step ``train.py`` runs, on one fixed batch.

  Args:
    model, config: the detector and its config (optim, dn, loss sections).
    variables: {'params', 'batch_stats'} numpy (the converted checkpoint).
    batch: ``fixed_batch`` of the bundle.
    steps: N.
    seed: the train state's PRNG seed (the denoising draws).
    on_step: called after each step with (step, host metrics, seconds).

  Returns {'metrics': [host metrics per step] ('loss', 'grad_norm' before
  clipping, 'lr', 'lr_backbone', every loss term), 'params' (numpy, after
  the last step), 'dn_keys' (the denoising key of each step), 'compiles'}.
  """

  mesh = mesh_lib.make_mesh(config, jax.devices()[:1])
  tx, _ = opt_lib.make_optimizer(config, steps_per_epoch=1)
  state = state_lib.create_train_state(
      {'params': variables['params'],
       'batch_stats': variables.get('batch_stats', {})}, tx,
      jax.random.PRNGKey(seed))
  shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
  state = jax.device_put(state, shardings)
  step_fn = step_lib.jit_train_step(
      step_lib.make_train_step(make_loss_fn(model, config), tx), mesh,
      shardings)
  device_batch = shd.shard_batch({k: batch[k] for k in TRAIN_KEYS
                                  if k in batch}, mesh)
  history, keys = [], []
  for i in range(steps):
    keys.append(jax.random.split(state.rng)[1])  # the step's dn key
    t0 = time.perf_counter()
    state, metrics = step_fn(state, device_batch)
    metrics = shd.to_host(metrics)
    history.append({k: float(v) for k, v in metrics.items()})
    if on_step is not None:
      on_step(i + 1, history[-1], time.perf_counter() - t0)
  return {'metrics': history, 'params': shd.to_host(state.params),
          'dn_keys': keys, 'compiles': compile_count(step_fn)}


def history_arrays(metrics: list[dict]) -> dict[str, np.ndarray]:
  """Per-step metrics -> the fixture's arrays: ``loss/<key>``, ``loss_total``,
  ``grad_global_norm``, each (N,)."""
  skip = {'loss', 'grad_norm', 'lr', 'lr_backbone'}
  keys = [k for k in metrics[0] if k not in skip and not k.startswith('lr_')]
  out = {f'loss/{k}': np.array([m[k] for m in metrics]) for k in keys}
  out['loss_total'] = np.array([m['loss'] for m in metrics])
  out['grad_global_norm'] = np.array([m['grad_norm'] for m in metrics])
  return out


def frozen_unchanged(final, start, config) -> Comparison:
  """Every parameter the optimiser labels frozen, bit-identical to start."""
  labels = param_labels(start, config)
  changed = jax.tree.map(
      lambda a, b, l: int(np.sum(np.asarray(a) != np.asarray(b)))
      if l == FROZEN else 0, final, start, labels)
  n = sum(1 for l in jax.tree.leaves(labels) if l == FROZEN)
  return Comparison(f'frozen params ({n} tensors) moved entries',
                    float(sum(jax.tree.leaves(changed))), 0.0, 'mismatches')


# --------------------------------------------------------------- entry point
def _format_terms(metrics: Mapping) -> str:
  skip = {'loss', 'grad_norm', 'lr', 'lr_backbone'}
  parts = [f'{k}={v:.6g}' for k, v in metrics.items() if k not in skip]
  lines, cur = [], '   '
  for p in parts:
    if len(cur) + len(p) > 96:
      lines.append(cur)
      cur = '   '
    cur += ' ' + p
  return '\n'.join(lines + [cur])


def _load_run(bundle: str, *, overrides: Optional[dict],
              config_path: Optional[str], out):
  """(files, variables, config, batch, the reference's trajectory or
  None) of a bundle: the converted checkpoint under the reference's
  order, trajectory.json's settings and the ``--config`` overrides."""
  files = bundle_files(bundle)
  config = load_config(config_path) if config_path else None
  variables, config, report = convert_checkpoint(files['checkpoint'], config)
  for source, values in (('the reference order', reference_order(config)),
                         ('trajectory.json', settings_overrides(
                             files['settings'])),
                         ('--config', dict(overrides or {}))):
    try:
      apply_overrides(config, values)
    except (KeyError, TypeError, ValueError) as e:
      raise TrajectoryInputError(f'{source} overrides {values}: {e}') from e
  o = config.optim
  out(f'converted {report.converted} tensors from {files["checkpoint"]}; '
      f'config {config.name}')
  out(f'optimiser: AdamW lr {o.lr:g} (backbone x{o.backbone_lr_mult:g}), '
      f'weight decay {o.weight_decay:g}, clip {o.clip_norm:g}, warm-up '
      f'{int(o.warmup_steps)} steps; dn noise label '
      f'{config.dn.label_noise_scale:g} box {config.dn.box_noise_scale:g}')
  with np.load(files['inputs'], allow_pickle=False) as f:
    batch = fixed_batch({k: f[k] for k in f.files})
  ref = None
  if files['trajectory']:
    with np.load(files['trajectory'], allow_pickle=False) as f:
      ref = {k: f[k] for k in f.files}
  return files, variables, config, batch, ref


def _compare_with_reference(ours: dict, ref: dict, dn: dict, final: dict,
                            start: dict, *, steps: int, out) -> list:
  """[Comparison] of our steps against the reference's trajectory: the
  dn queries, the per-step losses and (same step count) the parameters."""
  n_ref = int(ref['loss_total'].shape[0])
  n = min(steps, n_ref)
  results = [Comparison('dn queries == ground truth (label mismatches)',
                        float(dn['label_mismatches']), 0.0, 'mismatches')]
  results += compare_history(ours, ref, steps=n)
  out('per-step relative errors:')
  for row in step_errors(ours, ref, steps=n):
    out(f'  step {row["step"]}: loss_total {row["loss_total"]:.2e}  worst '
        f'term {row["worst_term"]:.2e} ({row["worst_term_key"]})  '
        f'grad_global_norm {row["grad_global_norm"]:.2e}')
  if steps == n_ref:
    results += compare_params(final, start, ref, steps=n)
    out('per-element figures (host-dependent, not asserted):')
    for line in ulp_summary(final, ref):
      out(line)
  else:
    out(f'-- parameters not compared: the reference ran {n_ref} steps, '
        f'we ran {steps}')
  return results


def verify_steps(bundle: str, *, steps: int, overrides: Optional[dict] = None,
                 dump: Optional[str] = None, config_path: Optional[str] = None,
                 seed: int = 0, out=print) -> bool:
  """``verify BUNDLE --steps N``: run, print, compare, dump.

  Returns True when every target holds (or there is nothing to compare).
  Raises FileNotFoundError / TrajectoryInputError on bad input (the
  message names it).
  """
  if steps < 1:
    raise TrajectoryInputError(f'--steps {steps}: expected a positive step count')
  files, variables, config, batch, ref = _load_run(
      bundle, overrides=overrides, config_path=config_path, out=out)
  model = build_model(config)

  def on_step(i, m, seconds):
    out(f'step {i}/{steps}: loss_total {m["loss"]:.6f}  grad_norm '
        f'{m["grad_norm"]:.6f} (before clipping)  lr {m.get("lr", 0):.3g}  '
        f'{seconds:.1f} s')
    out(_format_terms(m))

  t0 = time.perf_counter()
  run = run_steps(model, config, variables, batch, steps=steps, seed=seed,
                  on_step=on_step)
  out(f'{steps} steps in {time.perf_counter() - t0:.1f} s; the train step '
      f'compiled {run["compiles"]} time(s)')
  ours = history_arrays(run['metrics'])
  sd = state_dict_of(load_torch_checkpoint(files['checkpoint']),
                     files['checkpoint'])
  names = {k: np.ndim(v) for k, v in sd.items()}
  final = to_reference_names({'params': run['params']}, names,
                             collections=('params',))
  start = to_reference_names(variables, names, collections=('params',))

  results = [frozen_unchanged(run['params'], variables['params'], config)]
  dn = dn_noise_check(config, batch, run['dn_keys'])
  out(f'denoising queries vs the ground truth over {steps} draws: '
      f'{dn["label_mismatches"]} label mismatches, boxes max |diff| '
      f'{dn["box_max_abs"]:.3g}')
  if ref is not None:
    results += _compare_with_reference(ours, ref, dn, final, start,
                                       steps=steps, out=out)
  for r in results:
    out(r.line())
  failed = [r for r in results if not r.ok]
  out(f'{len(results) - len(failed)} of {len(results)} checks within target')
  if dump:
    arrays = dict(ours)
    arrays.update({f'param/{k}': v for k, v in final.items()})
    np.savez(dump, **arrays)
    out(f'wrote {len(arrays)} arrays to {dump}')
  return not failed
