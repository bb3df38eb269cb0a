"""``train.memory = 'auto'``: the fastest layer plan whose step fits.

Scanning identical layers and rematerialising them save memory at large
sizes and cost time at small ones (on XLA:CPU the tiny training step runs
about 1.8x faster unrolled without remat than scanned with full remat).
With ``train.memory = 'auto'`` the training step is compiled for each plan
below, fastest first, and the first whose compiled peak (the compiler's
own ``memory_analysis()``: temp + arguments + outputs - aliased) fits the
per-device budget is used:

    unrolled                 scan_layers False, remat 'none' everywhere
    scanned                  scan_layers True,  remat 'none'
    scanned, minimal remat   scan_layers True,  remat 'minimal'
    scanned, full remat      scan_layers True,  remat 'full'

Plans change memory and time, never values (``model/remat.py``), and the
parameters have one layout whatever the plan, so a checkpoint resumes
under any plan.  The budget is ``train.memory_budget_gb`` when > 0, else
the device's memory (``memory_stats()['bytes_limit']``; on a CPU, 80% of
the host's memory shared by its local devices).  When no plan fits, the
last is used and a warning names the shortfall.  The step is compiled on
the largest canvas of ``data.canvas_sizes`` (by area), so every batch of
the run fits.  ``train.memory = 'config'`` uses ``train.scan_layers`` and
``train.remat`` as written, compiling nothing extra.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import numpy as np

from ddq_jax.model.detector import build_model
from ddq_jax.model.remat import REMAT_PARTS
from ddq_jax.train import step as step_lib
from ddq_jax.train.objective import make_loss_fn
from ddq_jax.train.parallel import sharding as shd

log = logging.getLogger(__name__)

MEMORY_MODES = ('config', 'auto')
PLANS: tuple[tuple[str, bool, str], ...] = (
    # (name, scan_layers, remat policy of every part), fastest first
    ('unrolled', False, 'none'),
    ('scanned', True, 'none'),
    ('scanned, minimal remat', True, 'minimal'),
    ('scanned, full remat', True, 'full'),
)
HOST_MEMORY_FRACTION = 0.8
GB = 2.0 ** 30


def memory_mode(config) -> str:
  """``config.train.memory``, validated."""
  mode = str(config.train.memory)
  if mode not in MEMORY_MODES:
    raise ValueError(f"config field 'train.memory' is {mode!r}; expected "
                     f'one of {MEMORY_MODES}')
  return mode


def with_plan(config, plan: tuple[str, bool, str]):
  """A copy of ``config`` with ``plan``'s scan_layers and remat policies."""
  _, scan, remat = plan
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.train.scan_layers = scan
    for part in REMAT_PARTS:
      out.train.remat[part] = remat
  return out


def budget_bytes(config, device: jax.Device | None = None) -> int:
  """The per-device memory budget (see the module docstring)."""
  gb = float(config.train.memory_budget_gb)
  if gb > 0:
    return int(gb * GB)
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return int(HOST_MEMORY_FRACTION * host / max(jax.local_device_count(), 1))


def peak_bytes(compiled) -> int | None:
  """temp + arguments + outputs - aliased of a compiled step; None when
  the backend reports no memory analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes +
             m.output_size_in_bytes - m.alias_size_in_bytes)


def choose_plan(config, compile_plan: Callable[[Any], Any], *, budget: int
                ) -> tuple[Any, Any, list[dict]]:
  """The first plan of ``PLANS`` whose compiled step fits ``budget``.

  Args:
    config: the run's config (``train.memory = 'auto'``).
    compile_plan: config -> (result, compiled): builds and compiles the
      step under that config; ``result`` is returned for the chosen plan.
    budget: bytes per device.
  Returns:
    (the chosen plan's config, its ``result``, one report dict per plan
    compiled: name, peak_gb, fits).
  """
  report, last = [], None
  for plan in PLANS:
    candidate = with_plan(config, plan)
    result, compiled = compile_plan(candidate)
    peak = peak_bytes(compiled)
    fits = peak is None or peak <= budget
    report.append(dict(plan=plan[0], peak_gb=None if peak is None else
                       round(peak / GB, 3), fits=fits))
    last = (candidate, result)
    if fits:
      break
  else:
    log.warning('train.memory=auto: no plan fits the budget of %.2f GB per '
                'device (the smallest needs %.2f GB): using %r', budget / GB,
                report[-1]['peak_gb'], PLANS[-1][0])
  log.info('train.memory=auto: %s (budget %.2f GB per device; %s)',
           report[-1]['plan'], budget / GB,
           ', '.join(f"{r['plan']} {r['peak_gb']} GB" for r in report))
  return last[0], last[1], report


def largest_canvas_batch(host: dict, config, mesh, canvas=None) -> dict:
  """Abstract global batch like the process-local ``host`` batch, on
  ``canvas`` (h, w), default the largest of ``data.canvas_sizes`` (by
  area)."""
  h0, w0 = host['images'].shape[1:3]
  sizes = [tuple(s) for s in config.data.canvas_sizes] or [(h0, w0)]
  h, w = canvas or max(sizes, key=lambda s: s[0] * s[1])
  sharding = shd.batch_sharding(mesh)

  def abstract(x):
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    if shape[1:3] == (h0, w0):
      shape = shape[:1] + (h, w) + shape[3:]
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)
  return {k: abstract(v) for k, v in host.items()}


def plan_train_step(config, *, host_batch: dict, state, tx, mesh,
                    shardings, canvas=None
                    ) -> tuple[Any, Callable, Any, list[dict]]:
  """``choose_plan`` for the training step of the real model.

  Args:
    config: with ``train.memory = 'auto'``.
    host_batch: the first process-local batch (its keys and dtypes).
    state, tx, mesh, shardings: the run's train state (arrays or structs),
      optimiser, mesh and state shardings.
    canvas: (h, w) to plan for; default the largest of data.canvas_sizes.
  Returns:
    (the chosen config, its loss_fn, its compiled step for the largest
    canvas, the report); ``step.CompiledSteps.add`` takes the compiled
    step with ``largest_canvas_batch``.
  """
  batch = largest_canvas_batch(host_batch, config, mesh, canvas)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, shardings)

  def compile_plan(candidate):
    loss_fn = make_loss_fn(build_model(candidate), candidate, mesh=mesh)
    jitted = step_lib.jit_train_step(step_lib.make_train_step(
        loss_fn, tx, compute_dtype=candidate.train.compute_dtype),
        mesh, shardings)
    compiled = jitted.lower(abstract_state, batch).compile()
    return (loss_fn, compiled), compiled

  chosen, (loss_fn, compiled), report = choose_plan(
      config, compile_plan, budget=budget_bytes(config))
  return chosen, loss_fn, compiled, report
