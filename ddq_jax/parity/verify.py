"""Prove a converted checkpoint reproduces the reference, tensor by tensor.

    python -m ddq_jax verify BUNDLE_DIR [--train] [--dump OUT.npz]
        [--config PATH|NAME] [--config.KEY=VALUE ...]
    python -m ddq_jax verify BUNDLE_DIR --steps N [--dump OUT.npz] \\
        [--config PATH|NAME] [--config.KEY=VALUE ...]
    python -m ddq_jax verify BUNDLE_DIR --padding-invariant [--canvas H W]

BUNDLE_DIR is laid out like tests/data/tiny: ``checkpoint.pth`` (an
mmdetection DDQ-DETR checkpoint), ``inputs.npz`` (images, pad_mask,
img_shapes, scale_factors; for --train also gt_* and the injected
denoising queries dn_*), and optionally ``infer.npz`` / ``train.npz`` with
the reference's tensors.  Every tensor we can compare is printed with its
error against its target (``ddq_jax/parity/compare.py``); the exit status is 1 when a target is
missed, 2 on bad input.  ``--dump`` writes what we computed under the
fixture's key names and layouts.  ``--steps N`` runs N steps of the
training step and optimiser instead and compares them with the bundle's
``trajectory.npz`` (see ddq_jax/parity/trajectory.py).

By default the model runs as the reference's batched padding (what a
batch bundle such as tiny/ holds).  ``--padding-invariant`` runs inference
with ``padding_invariant`` on, for a batch-1 reference bundle (such as
tiny_single/a): ``--canvas H W`` places its images into a larger canvas
first; token-indexed tensors are then compared over each image's valid
region.  Detections are always compared as the reference's list up to
reordering within score ties, and ranked top-k indices up to neighbouring
ranks exchanged (near-ties in score).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from ddq_jax import cli
from ddq_jax.config import apply_overrides, load_config
from ddq_jax.io.conversion.converter import ConversionError, convert_checkpoint
from ddq_jax.io.conversion.mapping import match_rule, unstack_layers
from ddq_jax.io.conversion.mmdet_config import ConfigParseError
from ddq_jax.io.conversion.torch_pickle import CheckpointReadError
from ddq_jax.losses.config import CriterionConfig
from ddq_jax.losses.criterion import total_loss
from ddq_jax.model.detector import build_model, INTERMEDIATES
from ddq_jax.model.variables import init_variables
from ddq_jax.parity import trajectory
from ddq_jax.parity.canvas import (place_in_canvas, tie_ordered_detections,
                                   unpadded_view)
from ddq_jax.parity.compare import compare, Comparison
from ddq_jax.parity.fixture_names import fixture_tensors
from ddq_jax.train.objective import forward_and_losses


def _load_npz(path):
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _dn_slot_view(x, *, axis, d_ref, d_ours):
  """Our static denoising slots -> the reference's: keep the first d_ref of
  our d_ours slots (the rest are unused, masked slots)."""
  if d_ref == d_ours:
    return x
  x = np.asarray(x)
  idx = np.r_[0:d_ref, d_ours:x.shape[axis]]
  return np.take(x, idx, axis=axis)


def run_inference(model, variables, inputs):
  """The inference forward's intermediates (fixture names -> numpy)."""

  def fn(v, *a):
    _, state = model.apply(v, a[0], a[1], img_shapes=a[2],
                           scale_factors=a[3], mutable=[INTERMEDIATES])
    return fixture_tensors(state[INTERMEDIATES])
  args = (inputs['images'].astype(np.float32), inputs['pad_mask'].astype(bool),
          inputs['img_shapes'].astype(np.int32),
          inputs['scale_factors'].astype(np.float32))
  t0 = time.perf_counter()
  out = jax.device_get(jax.jit(fn)(variables, *args))
  return dict(out), time.perf_counter() - t0


def training_batch(inputs) -> dict:
  """The training batch of a bundle's ``inputs.npz`` (``bundle_inputs``):
  images, pad_mask, img_shapes and the ground truth, in the step's
  dtypes."""
  return dict(images=inputs['images'].astype(np.float32),
              pad_mask=inputs['pad_mask'].astype(bool),
              img_shapes=inputs['img_shapes'].astype(np.int32),
              gt_boxes=inputs['gt_boxes'].astype(np.float32),
              gt_labels=inputs['gt_labels'].astype(np.int32),
              gt_valid=inputs['gt_valid'].astype(bool))


def run_training(model, config, variables, inputs):
  """Training forward + every loss + gradients, with the injected dn
  queries.  Returns (total, intermediates, losses, grads, num_dn_slots,
  seconds)."""
  cfg = CriterionConfig.from_config(config)
  batch = training_batch(inputs)
  inject = (dict(label_ids=inputs['dn_label_ids'],
                 reference_points=inputs['dn_reference_points'])
            if 'dn_label_ids' in inputs else None)  # else the config's noise
  num_dn_slots = []

  def objective(params):
    losses, out, inter = forward_and_losses(
        model, {'params': params, 'batch_stats': variables['batch_stats']},
        batch, jax.random.key(0), cfg=cfg, dn_inject=inject,
        capture_intermediates=True)
    num_dn_slots.append(out.layout.num_dn)
    return total_loss(losses), (fixture_tensors(inter), losses)

  t0 = time.perf_counter()
  (loss, (out, losses)), grads = jax.device_get(
      jax.jit(jax.value_and_grad(objective, has_aux=True))(
          variables['params']))
  return (loss, dict(out), losses, grads, num_dn_slots[-1],
          time.perf_counter() - t0)


def grad_of(grads, torch_name, ref):
  """The gradient of a torch tensor, in torch's layout, from per-layer
  gradients (``unstack_layers``); None when we have no such parameter."""
  rule, path = match_rule(torch_name, ref.ndim)
  if rule is None or not path or path[0] != 'params':
    return None
  node = grads
  for key in path[1:]:
    if key not in node:
      return None
    node = node[key]
  return _torch_layout(np.asarray(node), rule)


def _torch_layout(x, rule):
  """Our leaf back to the torch layout (inverse of the table's layout)."""
  name = getattr(rule.layout, '__name__', '')
  if name == '_linear':
    return x.T
  if name == '_conv':
    return np.transpose(x, (3, 2, 0, 1))
  return x


def global_norm(tree):
  return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                           for x in jax.tree.leaves(tree))))


INIT_JSON = 'init.json'


def init_weights(path: str, config=None):
  """(variables, config) of a bundle whose weights are a fresh
  initialisation: ``init.json`` = {"config": NAME, "seed": S,
  "overrides": {KEY: VALUE}}, ``init_variables`` of that config (jitted)
  with ``jax.random.key(S)``.  ``config`` replaces the named one."""
  with open(path) as f:
    spec = json.load(f)
  if config is None:
    config = load_config(spec['config'], spec.get('overrides', {}))
  model = build_model(config)
  variables = jax.jit(lambda k: init_variables(model, config, k))(
      jax.random.key(int(spec['seed'])))
  return jax.device_get(variables), config


def bundle_inputs(inputs: dict) -> dict:
  """A bundle's inputs; ``images`` generated when the bundle holds only
  ``images_seed``: uniform [0, 1) float32 over the ``pad_mask`` canvas
  (NumPy's PCG64 stream, the same on every host), as mmdetection's own
  detector test feeds ``torch.rand`` images."""
  if 'images' not in inputs and 'images_seed' in inputs:
    inputs = dict(inputs)
    b, h, w = inputs['pad_mask'].shape
    inputs['images'] = np.random.default_rng(
        int(inputs['images_seed'])).random((b, h, w, 3), dtype=np.float32)
  return inputs


def clip_survivor_counts(ours: dict, ref: dict, config) -> tuple[dict, dict]:
  """``num_kept_after_nms`` counts the reference's NMS survivors among all
  proposals, ours among the ``nms_pre_topk`` candidates.  When there were
  more proposals than candidates, only the distinct queries kept (the count
  clipped at ``num_queries``) are comparable: both views get that instead."""
  key = 'num_kept_after_nms'
  if (key not in ours or key not in ref or
      np.shape(ours['output_proposals'])[1] <= config.nms_pre_topk):
    return ours, ref
  ours, ref = dict(ours), dict(ref)
  for d in (ours, ref):
    d[key] = np.minimum(np.asarray(d[key]), config.num_queries)
  return ours, ref


def _nms_cut_check(stage, intermediates, config, out):
  """The encoder NMS's candidate bound: how many survivors each image kept
  among its ``nms_pre_topk`` candidates, and a check that no image may have
  lost one to the bound."""
  cut = np.asarray(intermediates['nms_cut']).reshape(-1)
  kept = np.asarray(intermediates['num_kept_after_nms']).reshape(-1)
  out(f'{stage}: encoder NMS kept {kept.tolist()} of {config.nms_pre_topk} '
      f'candidates per image; static bound may have cut '
      f'{int(cut.sum())} image(s)')
  return Comparison(f'{stage} encoder NMS candidates cut (images)',
                    float(cut.sum()), 0.0, 'mismatches')


def load_bundle(bundle: str, *, config=None, overrides: dict | None = None,
                padding_invariant: bool = False,
                canvas: tuple[int, int] | None = None, out=print):
  """(variables, config, inputs) of a bundle: its weights (converted, or
  initialised as ``init.json`` says), the config (``overrides`` apply to
  the checkpoint's own) and its inputs (placed in ``canvas``)."""
  ckpt = os.path.join(bundle, 'checkpoint.pth')
  init = os.path.join(bundle, INIT_JSON)
  inputs_path = os.path.join(bundle, 'inputs.npz')
  for path in ((ckpt if not os.path.isfile(init) else init), inputs_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: missing; a bundle holds checkpoint.pth '
                              f'(or {INIT_JSON}) and inputs.npz (optionally '
                              'infer.npz, train.npz)')
  given = config is not None
  if os.path.isfile(init):
    variables, config = init_weights(init, config)
    out(f'initialised the weights as {INIT_JSON} says; config {config.name}')
  else:
    variables, config, report = convert_checkpoint(ckpt, config)
    out(f'converted {report.converted} tensors ({len(report.ignored)} '
        f'ignored) config {config.name}')
  if not given:
    apply_overrides(config, overrides or {})
  config.padding_invariant = bool(padding_invariant)
  inputs = bundle_inputs(_load_npz(inputs_path))
  if canvas is not None:
    inputs = place_in_canvas(inputs, canvas=canvas)
    out(f'images placed in a {canvas[0]}x{canvas[1]} canvas')
  return variables, config, inputs


def check_inference(bundle: str, model, config, variables, inputs, *,
                    padding_invariant: bool, out=print):
  """The inference forward against the bundle's ``infer.npz``: (our
  tensors under the fixtures' names, [Comparison])."""
  ours, seconds = run_inference(model, variables, inputs)
  out(f'inference: {seconds:.1f} s (compile + run)')
  results = [_nms_cut_check('inference', ours, config, out)]
  dumped = {key: np.asarray(value) for key, value in ours.items()}
  ref_path = os.path.join(bundle, 'infer.npz')
  if os.path.isfile(ref_path):
    ref = _load_npz(ref_path)
    view = unpadded_view(dumped, ref) if padding_invariant else dict(dumped)
    # Detections compare as the reference's list up to reordering within
    # score ties (a float32 port may return near-equal scores either way).
    view.update(tie_ordered_detections(view, ref))
    view, ref = clip_survivor_counts(view, ref, config)
    for key in sorted(ref):
      if key in view:
        results.append(compare(key, view[key], ref[key]))
      else:
        out(f'--   {key:<44s} not produced by us')
  return dumped, results


def _in_reference_slots(tensors: dict, *, d_ref: int, d_ours: int) -> dict:
  """Every query axis (size Q = our D + the rest) in the reference's dn
  slot layout (``_dn_slot_view``)."""
  num_queries = tensors['decoder_query_in'].shape[1]
  out = {}
  for key, value in tensors.items():
    value = np.asarray(value)
    for axis in range(value.ndim):
      if value.shape[axis] == num_queries:
        value = _dn_slot_view(value, axis=axis, d_ref=d_ref, d_ours=d_ours)
    out[key] = value
  return out


def _compare_training(train_dump: dict, ref: dict, grads, config, out):
  """[Comparison] of every train.npz key we produce (gradients in torch's
  per-layer names and layouts); ``train_dump`` gains the gradients."""
  results = []
  train_dump, ref = clip_survivor_counts(train_dump, ref, config)
  per_layer = unstack_layers({'params': grads})['params']
  for key in sorted(ref):
    if key.startswith('grad/'):
      g = grad_of(per_layer, key[5:], ref[key])
      if g is None:
        out(f'--   {key:<44s} no such parameter')
        continue
      train_dump[key] = g
    if key in train_dump:
      if train_dump[key].size == ref[key].size:  # the reference's layout,
        train_dump[key] = train_dump[key].reshape(ref[key].shape)  # e.g. (1,)
      results.append(compare(f'train:{key}' if not key.startswith(
          ('loss', 'grad')) else key, train_dump[key], ref[key]))
  return train_dump, results


def check_training(bundle: str, model, config, variables, inputs, *,
                   out=print):
  """Training forward, losses and gradients against the bundle's
  ``train.npz``: (our tensors to dump, [Comparison])."""
  loss, tout, losses, grads, d_ours, seconds = run_training(
      model, config, variables, inputs)
  out(f'training forward + loss + gradients: {seconds:.1f} s')
  results = [_nms_cut_check('training', tout, config, out)]
  d_ref = (int(inputs['dn_label_ids'].shape[1]) if 'dn_label_ids' in inputs
           else d_ours)  # drawn, not injected: no slot layout to map
  train_dump = _in_reference_slots(tout, d_ref=d_ref, d_ours=d_ours)
  for key, value in losses.items():
    train_dump[f'loss/{key}'] = np.asarray(value)
  train_dump['loss_total'] = np.asarray(loss).reshape(1)
  train_dump['grad_global_norm'] = np.asarray(global_norm(grads))
  ref_path = os.path.join(bundle, 'train.npz')
  if os.path.isfile(ref_path):
    train_dump, compared = _compare_training(
        train_dump, _load_npz(ref_path), grads, config, out)
    results += compared
  return ({(k if k.startswith(('loss', 'grad')) else f'train/{k}'): v
           for k, v in train_dump.items()}, results)


def verify(bundle: str, *, train: bool = False, dump: str | None = None,
           config=None, overrides: dict | None = None, out=print,
           padding_invariant: bool = False,
           canvas: tuple[int, int] | None = None) -> bool:
  """Runs the bundle's checks; True when every tensor is within target.
  ``config``: instead of the checkpoint's ``meta['cfg']`` (which then takes
  ``overrides``)."""
  variables, config, inputs = load_bundle(
      bundle, config=config, overrides=overrides,
      padding_invariant=padding_invariant, canvas=canvas, out=out)
  model = build_model(config)
  dumped, results = check_inference(bundle, model, config, variables, inputs,
                                    padding_invariant=padding_invariant,
                                    out=out)
  if train:
    train_dump, train_results = check_training(bundle, model, config,
                                               variables, inputs, out=out)
    dumped.update(train_dump)
    results += train_results
  for r in results:
    out(r.line())
  failed = [r for r in results if not r.ok]
  out(f'{len(results) - len(failed)} of {len(results)} tensors within target')
  if dump:
    np.savez(dump, **dumped)
    out(f'wrote {len(dumped)} arrays to {dump}')
  return not failed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ddq_jax verify', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('bundle', help='directory with checkpoint.pth, '
                      'inputs.npz and optionally infer.npz / train.npz')
  parser.add_argument('--train', action='store_true',
                      help='also run the training forward, every loss and '
                      'the gradients, and compare with train.npz')
  parser.add_argument('--dump', default=None,
                      help='write our tensors to this .npz (fixture key names)')
  cli.add_config_argument(parser, help_text="instead of the checkpoint's "
                          "meta['cfg'].")
  parser.add_argument('--steps', type=int, default=None, metavar='N',
                      help='run N optimiser steps of the training step on '
                      "the bundle's batch and compare with its "
                      'trajectory.npz; --config.KEY=VALUE overrides config '
                      "fields (after trajectory.json's settings)")
  parser.add_argument('--padding-invariant', action='store_true',
                      help='run inference with config padding_invariant on '
                      '(for a batch-1 reference bundle)')
  parser.add_argument('--canvas', type=int, nargs=2, metavar=('H', 'W'),
                      help='place the bundle\'s images into an H x W canvas '
                      '(with --padding-invariant)')
  args, overrides = cli.parse_args(parser, argv)
  if args.steps is not None and args.train:
    parser.error('--steps and --train are separate runs: give one')
  if args.canvas and not args.padding_invariant:
    parser.error('--canvas needs --padding-invariant (the reference\'s '
                 'batched padding depends on the canvas)')
  if args.steps is not None and args.padding_invariant:
    parser.error('--steps and --padding-invariant are separate runs')
  config = (cli.load_or_fail(parser, args.config, overrides)
            if args.config and args.steps is None else None)
  bad_input = (FileNotFoundError, CheckpointReadError, ConfigParseError,
               ConversionError, KeyError, ValueError)
  if args.steps is not None:
    bad_input += (trajectory.TrajectoryInputError,)
  try:
    if args.steps is not None:
      ok = trajectory.verify_steps(args.bundle, steps=args.steps,
                                   dump=args.dump, config_path=args.config,
                                   overrides=overrides)
    else:
      ok = verify(args.bundle, train=args.train, dump=args.dump,
                  config=config, overrides=overrides,
                  padding_invariant=args.padding_invariant,
                  canvas=tuple(args.canvas) if args.canvas else None)
  except bad_input as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
