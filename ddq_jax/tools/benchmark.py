"""Benchmark: step time, compile time and hot spots of inference or training.

  python -m ddq_jax benchmark --config tiny --mode infer --batch 2 --size 128 128
  python -m ddq_jax benchmark --config ddq_r50_4scale --mode train --batch 1 \\
      --size 800 1333 --steps 3
  python -m ddq_jax benchmark --config ddq_r50_4scale --mode train \\
      --target tpu:v5e:2x4 --batch-per-chip 2 --size 800 1344   # no run

With --target the step is compiled for that TPU / GPU target on this
machine (``ddq_jax/tools/accelerators``) and the line holds its per-chip
figures, collectives and host callbacks instead of step times.

Prints one JSON line: config, mode, batch, size, devices, device_kind,
init_s, lower_s and compile_s (tracing + lowering, XLA compile; apart from the
steps), peak_memory_gb (temp + arguments + outputs - aliased, from the
compiled step's memory analysis), temp_memory_gb, gflops, hlo_lines,
step_median_s,
step_min_s, images_per_s (batch / median step), images_per_s_best (batch /
min step), and the hot spots of one profiled step:

* ``hot_ops``: the most expensive XLA ops (name, opcode, ms per step, share,
  and the JAX/Flax scope they come from, e.g.
  ``forward_encoder/backbone/layer3_0/conv2``);
* ``stages``: the same time summed by model stage (backbone, neck, encoder
  deformable attention sampling / projections, pre-decoder NMS, decoder,
  head, loss, Hungarian, backward of each, optimizer).

How the hot spots are measured (reliable on CPU and GPU): the compiled step
runs under ``jax.profiler.trace``; the trace's per-op events (XLA thunks /
kernels, named after the optimised HLO instructions) are matched to the
instructions of ``compiled.as_text()``, whose ``op_name`` metadata carries the
Flax module path.  Self time (an event minus its nested events, e.g. a
``while`` loop minus its body) is summed per instruction and per stage, so
nothing is counted twice.  On a multi-threaded CPU the shares are shares of
op time (CPU time), not of wall time.  Jitting stages separately was
rejected: it changes fusion and hides cross-stage overlap.

Random weights (``init_variables`` under jit) unless --weights is given;
inputs are random images and a few random ground-truth boxes per image.
--mode infer runs the one inference program (``serve.detect``: uint8
canvases in, detections out), the one evaluate, predict and export run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import jax
import numpy as np

from ddq_jax import cli
from ddq_jax.compilation_cache import enable_compilation_cache
from ddq_jax.io.weights import load_weights
from ddq_jax.model.detector import build_model
from ddq_jax.model.variables import init_variables, variable_shapes
from ddq_jax.serve.detect import jit_detect_fn
from ddq_jax.tools.accelerators import deviceless, targets
from ddq_jax.tools.accelerators.hlo_stats import memory_figures
from ddq_jax.tools.profiling import analyze, hot_spots
from ddq_jax.train import memory_plan
from ddq_jax.train import state as state_lib
from ddq_jax.train import step as step_lib
from ddq_jax.train.objective import make_loss_fn
from ddq_jax.train.optimizer import make_optimizer
from ddq_jax.train.parallel import sharding as shd
from ddq_jax.train.parallel.mesh import make_mesh, mesh_shape
from ddq_jax.tree_paths import map_with_paths, split


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m ddq_jax benchmark',
      description='Step time, compile time and hot spots (one JSON line).',
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  cli.add_config_argument(p, help_text='required unless --analyze.')
  p.add_argument('--mode', choices=('infer', 'train'), default='infer',
                 help='infer: the jitted predict fn; train: the training '
                 'step (training/step.py: forward, losses, gradients, '
                 'optimizer update)')
  p.add_argument('--batch', type=int, default=None, help='global batch size '
                 '(default 1, or --batch-per-chip x the data axis)')
  p.add_argument('--batch-per-chip', type=int, default=None, metavar='N',
                 help='images per device of the data axis (the global batch '
                 'is N x that axis); with --target the default is 1')
  p.add_argument('--target', metavar='SPEC', help='compile the step for an '
                 'accelerator this machine need not have, with abstract '
                 'inputs only, and print its per-chip figures (no run): '
                 'tpu:<topology> (tpu:v5e:2x4, tpu:v4:2x2x1, tpu:v6e:2x4, '
                 '...) or gpu:<h100|h200|a100>[:<count>] (gpu:h100:8); '
                 "needs pip install 'ddq-jax[tpu]' / 'ddq-jax[cuda]' "
                 '(ddq_jax/tools/accelerators)')
  p.add_argument('--hlo-out', metavar='FILE', help='with --target: write '
                 'the optimised HLO (compiled.as_text()) here')
  p.add_argument('--size', type=int, nargs=2, default=(800, 1333),
                 metavar=('H', 'W'), help='canvas height and width')
  p.add_argument('--devices', type=int, help='first K devices (default all); '
                 'the batch is split over them')
  p.add_argument('--steps', type=int, default=5, help='timed steps')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps after '
                 'compilation')
  p.add_argument('--no-profile', action='store_true', help='skip the '
                 'profiled step (no hot spots)')
  p.add_argument('--profile-steps', type=int, default=1, help='steps under '
                 'the profiler; the hot spots are their mean per step (more '
                 'steps: less noise from a shared machine)')
  p.add_argument('--top', type=int, default=8, help='hot ops to list')
  p.add_argument('--weights', help='converted weights dir or .pth instead '
                 'of random weights')
  p.add_argument('--init', choices=('fast', 'flax'), default='fast',
                 help='random weights: fast = the variables\' shapes '
                 '(eval_shape, no compile) filled with numpy (fan-in normal '
                 'kernels, unit scales / BN var, zero biases / BN mean); '
                 'flax = init_variables under jit (a training-forward '
                 'compile: minutes for R50 on CPU)')
  p.add_argument('--trace-dir', help='keep the profiler trace (and the '
                 'compiled HLO text) here')
  p.add_argument('--analyze', metavar='TRACE_DIR', help='only print the hot '
                 'spots of a trace saved with --trace-dir (no run)')
  p.add_argument('--compile-only', action='store_true', help='lower and '
                 'compile the step, print its memory / FLOP / HLO figures, '
                 'run nothing (needs no device buffers beyond the weights)')
  p.add_argument('--max-memory-gb', type=float, default=0.0, help='refuse '
                 'to run the steps when the compiled step\'s peak memory '
                 'exceeds this (0: no limit)')
  p.add_argument('--no-compilation-cache', action='store_true',
                 help='do not use the persistent compilation cache')
  return p


def compiled_stats(compiled, *, lower_s: float, compile_s: float) -> dict:
  """XLA's accounting of a compiled step (deterministic, no run).

  peak_memory_gb = temp + arguments + outputs - aliased (donated inputs
  reused for outputs); temp_memory_gb = XLA's temporary buffers; gflops from
  the cost analysis, which counts a ``while`` body once (with the scanned
  encoder / decoder layers it is a lower bound: compare runs with
  ``--set train.scan_layers=False``); hlo_lines = lines of
  ``compiled.as_text()``."""
  res = dict(lower_s=round(lower_s, 2), compile_s=round(compile_s, 2))
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  res.update(memory_figures(m))
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    flops = float((cost or {}).get('flops', 0.0))
    res['gflops'] = round(flops / 1e9, 1)
  except Exception:  # pylint: disable=broad-except
    pass
  res['hlo_lines'] = compiled.as_text().count('\n') + 1
  return res


# --------------------------------------------------------------- hot spots


def _inputs(config, batch: int, size, seed: int = 0, *, mode: str = 'train'):
  """Random inputs: normalised float images (train) or uint8 canvases
  (infer), real sizes = the canvas, a few ground-truth boxes per image."""
  rng = np.random.default_rng(seed)
  h, w = size
  g = int(config.loss.max_gt)
  n = min(g, 8)
  xy = rng.uniform(0, 0.6, (batch, g, 2)) * (w, h)
  wh = rng.uniform(0.05, 0.4, (batch, g, 2)) * (w, h)
  boxes = np.concatenate([xy, np.minimum(xy + wh, (w, h))], -1)
  images = (rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
            if mode == 'infer'
            else rng.standard_normal((batch, h, w, 3)).astype(np.float32))
  return dict(
      images=images,
      pad_mask=np.zeros((batch, h, w), bool),
      img_shapes=np.tile(np.array([[h, w]], np.int32), (batch, 1)),
      scale_factors=np.ones((batch, 2), np.float32),
      gt_boxes=boxes.astype(np.float32),
      gt_labels=rng.integers(0, config.num_classes, (batch, g)).astype(
          np.int32),
      gt_valid=np.arange(g)[None].repeat(batch, 0) < n)


def random_variables(config, seed: int = 0) -> dict:
  """Random variables with init_variables' tree and shapes, no compile."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = split(path)[-1]
    shape, dtype = tuple(leaf.shape), leaf.dtype
    if not np.issubdtype(dtype, np.floating):
      return np.zeros(shape, dtype)
    if name in ('var', 'scale'):
      return np.ones(shape, dtype)
    if name in ('mean', 'bias'):
      return np.zeros(shape, dtype)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    std = 1.0 / np.sqrt(max(fan_in, 1)) if name == 'kernel' else 0.02
    if name == 'level_embed':
      std = 1.0
    return (rng.standard_normal(shape) * std).astype(dtype)
  return map_with_paths(fill, variable_shapes(config))


def build_step(config, mode: str, variables, batch: dict, mesh):
  """(jitted fn, args tuple, step(args) -> (new args, output to block on)).

  Shardings come from ``parallel/`` (the mesh of ``config.mesh``); train
  mode runs the real training step of ``training/step.py``."""
  batch = shd.shard_batch(batch, mesh)
  if mode == 'infer':
    variables = shd.place_tree(variables, mesh, config)
    fn = jit_detect_fn(config).jitted
    args = (variables, batch['images'], batch['img_shapes'],
            batch['scale_factors'])
    return fn, args, lambda a, out_fn: (a, out_fn(*a))
  model = build_model(config)
  loss_fn = make_loss_fn(model, config, mesh=mesh)
  tx, _ = make_optimizer(config, steps_per_epoch=1000)
  make = lambda v: state_lib.create_train_state(  # noqa: E731
      v, tx, jax.random.PRNGKey(0))
  shardings = state_lib.state_shardings(jax.eval_shape(make, variables), mesh,
                                        config)
  state = jax.jit(make, out_shardings=shardings)(variables)
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, tx, compute_dtype=str(
          config.train.compute_dtype)), mesh, shardings)

  def step(a, out_fn):
    new_state, metrics = out_fn(*a)
    return (new_state, a[1]), metrics['loss']
  return fn, (state, batch), step


def _memory_plan(config, variables, batch: dict, mesh, canvas):
  """``train.memory=auto`` at the benchmark's canvas: (the chosen config,
  the plans compiled with their peaks)."""
  tx, _ = make_optimizer(config, steps_per_epoch=1000)
  abstract = jax.eval_shape(lambda v: state_lib.create_train_state(
      v, tx, jax.random.PRNGKey(0)), variables)
  chosen, _, _, report = memory_plan.plan_train_step(
      config, host_batch=batch, state=abstract, tx=tx, mesh=mesh,
      shardings=state_lib.state_shardings(abstract, mesh, config),
      canvas=canvas)
  return chosen, report


def _variables(args, config):
  """(variables, config, seconds): --weights, else a fast random fill or
  the model's initialisation."""
  t = time.perf_counter()
  if args.weights:
    variables, config = load_weights(args.weights, config)
  elif args.init == 'fast':
    variables = random_variables(config)
  else:
    model = build_model(config)
    variables = jax.jit(lambda r: init_variables(model, config, r))(
        jax.random.key(0))
  variables = jax.block_until_ready(variables)
  return variables, config, time.perf_counter() - t


def _host_figures() -> dict:
  return dict(jax=jax.__version__, host_cpus=os.cpu_count(),
              peak_host_rss_gb=round(resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
              load_avg_1m=round(os.getloadavg()[0], 2))


def _time_steps(step, compiled, fargs, *, warmup: int, steps: int):
  """(``once``: one step, blocking; the last output; per-step seconds)."""
  state = {'a': fargs}

  def once():
    state['a'], out = step(state['a'], compiled)
    jax.block_until_ready(out)
    return out

  for _ in range(max(0, warmup)):
    out = once()
  times = []
  for _ in range(max(1, steps)):
    t = time.perf_counter()
    out = once()
    times.append(time.perf_counter() - t)
  return once, out, times


def run(args) -> dict:
  config = args.config_dict
  devices = jax.devices()[:args.devices] if args.devices else jax.devices()
  if args.batch is None:
    args.batch = (args.batch_per_chip or 1) * (
        mesh_shape(config, len(devices))[0] if args.batch_per_chip else 1)
  mesh = make_mesh(config, devices)
  if args.batch % int(mesh.shape['data']):
    raise SystemExit(f'--batch {args.batch} is not divisible by the '
                     f"{int(mesh.shape['data'])} devices of the data axis")
  variables, config, init_s = _variables(args, config)
  batch = _inputs(config, args.batch, tuple(args.size), mode=args.mode)
  if args.mode == 'infer':
    batch = {k: batch[k] for k in ('images', 'img_shapes', 'scale_factors')}
  else:
    batch = {k: v for k, v in batch.items() if k != 'scale_factors'}
  plan = None
  if args.mode == 'train' and memory_plan.memory_mode(config) == 'auto':
    config, plan = _memory_plan(config, variables, batch, mesh,
                                tuple(args.size))
  fn, fargs, step = build_step(config, args.mode, variables, batch, mesh)
  t = time.perf_counter()
  lowered = fn.lower(*fargs)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  xla_s = time.perf_counter() - t
  stats = compiled_stats(compiled, lower_s=lower_s, compile_s=xla_s)
  head = dict(config=str(config.name), mode=args.mode,
              batch=args.batch, size=list(args.size), devices=len(devices),
              device_kind=devices[0].device_kind,
              platform=devices[0].platform, init_s=round(init_s, 2),
              **stats)
  if plan is not None:
    head['memory_plan'] = plan
  if args.compile_only:
    return dict(head, compile_only=True, **_host_figures())
  if args.max_memory_gb and stats.get('peak_memory_gb', 0) > args.max_memory_gb:
    raise SystemExit(
        f'the compiled step needs {stats["peak_memory_gb"]} GB '
        f'(--max-memory-gb {args.max_memory_gb}); not running it')
  once, out, times = _time_steps(step, compiled, fargs, warmup=args.warmup,
                                 steps=args.steps)
  med, best = statistics.median(times), min(times)
  res = dict(head, steps=len(times),
             step_median_s=round(med, 4), step_min_s=round(best, 4),
             step_times_s=[round(x, 4) for x in times],
             images_per_s=round(args.batch / med, 3),
             images_per_s_best=round(args.batch / best, 3),
             **_host_figures())
  if args.mode == 'train':
    res['loss'] = float(np.asarray(out))
  mem = getattr(devices[0], 'memory_stats', lambda: None)()
  if mem and 'peak_bytes_in_use' in mem:
    res['device_peak_memory_gb'] = round(mem['peak_bytes_in_use'] / 2**30, 3)
  if not args.no_profile:
    res.update(hot_spots(once, compiled.as_text(), top=args.top,
                         steps=args.profile_steps,
                         trace_dir=args.trace_dir))
  return res


def bad_argument(args) -> str | None:
  """One line naming the first numeric argument out of range, or None."""
  for flag, value, least in (('--batch', args.batch, 1),
                             ('--steps', args.steps, 1),
                             ('--warmup', args.warmup, 0),
                             ('--top', args.top, 1),
                             ('--profile-steps', args.profile_steps, 1),
                             ('--devices', args.devices, 1)):
    if value is not None and value < least:
      return f'{flag} must be >= {least}, got {value}'
  if min(args.size) < 1:
    return (f'--size {args.size[0]} {args.size[1]}: expected a positive '
            'height and width')
  return None


def run_target(parser, args, overrides) -> dict:
  """--target: the deviceless compile of ``ddq_jax.tools.accelerators``."""
  try:
    target = targets.parse_target(args.target)
  except targets.TargetError as e:
    cli.fail(parser, str(e))
  targets.use_cpu_runtime()
  config = cli.load_or_fail(parser, args.config, overrides)
  try:
    return deviceless.compile_for_target(
        config, target, mode=args.mode, batch_per_chip=args.batch_per_chip,
        batch=args.batch, size=tuple(args.size), hlo_out=args.hlo_out)
  except (targets.TargetError, ValueError) as e:
    cli.fail(parser, str(e))


def main(argv=None) -> dict:
  parser = _parser()
  args, overrides = cli.parse_args(parser, argv)
  if args.analyze:
    res = analyze(args.analyze, top=args.top)
  elif not args.config:
    cli.fail(parser, '--config is required')
  elif args.target:
    res = run_target(parser, args, overrides)
  else:
    problem = bad_argument(args)
    if problem:
      cli.fail(parser, problem)
    args.config_dict = cli.load_or_fail(parser, args.config, overrides)
    enable_compilation_cache(not args.no_compilation_cache)
    res = run(args)
  print(json.dumps(res), flush=True)
  return res


if __name__ == '__main__':
  sys.exit(0 if main() else 1)
