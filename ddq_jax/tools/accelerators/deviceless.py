"""Compile the real training or inference step for a TPU / GPU target here.

    python -m ddq_jax benchmark --config ddq_r50_4scale --mode train \\
        --target tpu:v5e:2x4 --batch-per-chip 2 --size 800 1344

Nothing is materialised: the variables, the train state and the batch are
``jax.ShapeDtypeStruct``s (``jax.eval_shape``) carrying ``NamedSharding``s on
a mesh of the target's devices, built with the same ``make_mesh``,
``state_shardings``, ``make_loss_fn``, ``make_optimizer`` and
``jit_train_step`` as training (inference: ``serve.detect``'s program
with the parameters under ``config.mesh``'s partition rules).  Tracing runs inside
``backend.target_platform`` so the graph is the one the target's own host
would build.  The figures are per chip, from the target compiler's own
accounting:

* memory: ``compiled.memory_analysis()`` (peak = temp + arguments +
  outputs - aliased);
* FLOPs: ``compiled.cost_analysis()``; on the GPU path that returns None,
  so the optimised HLO module goes through the CPU client's
  ``hlo_module_cost_analysis`` (a ``while`` body counts once either way);
* collectives and host callbacks: parsed from ``compiled.as_text()``
  (``hlo_stats.py``).

Nothing is autotuned on the GPU path (default Triton tiles, cuDNN
convolutions with ``algo -1`` and no workspace, so convolution workspaces
are missing from the temp bytes).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

try:  # jax internals (the GPU path's FLOPs); absent ones mean no FLOPs
  from jax._src import xla_bridge
  from jax._src.lib import _jax
except ImportError:
  xla_bridge = _jax = None

from ddq_jax.tools.accelerators import hlo_stats
from ddq_jax.tools.accelerators.targets import Target, topology_devices
from ddq_jax import backend
from ddq_jax.model.detector import build_model
from ddq_jax.model.variables import variable_shapes
from ddq_jax.serve.detect import jit_detect_fn
from ddq_jax.train import state as state_lib
from ddq_jax.train import step as step_lib
from ddq_jax.train.objective import make_loss_fn
from ddq_jax.train.optimizer import make_optimizer
from ddq_jax.train.parallel import sharding as shd
from ddq_jax.train.parallel.mesh import DATA, make_mesh

GB = 2.0 ** 30


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def abstract_batch(config, mode: str, batch: int, size, mesh) -> dict:
  """The benchmark's batch (``benchmark._inputs``) as sharded shapes."""
  h, w = size
  g = int(config.loss.max_gt)
  if mode == 'infer':  # the inference program's uint8 canvases
    spec = dict(images=((batch, h, w, 3), jnp.uint8),
                img_shapes=((batch, 2), jnp.int32),
                scale_factors=((batch, 2), jnp.float32))
  else:
    spec = dict(images=((batch, h, w, 3), jnp.float32),
                pad_mask=((batch, h, w), jnp.bool_),
                img_shapes=((batch, 2), jnp.int32))
    spec.update(gt_boxes=((batch, g, 4), jnp.float32),
                gt_labels=((batch, g), jnp.int32),
                gt_valid=((batch, g), jnp.bool_))
  sharding = shd.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding)
          for k, (s, d) in spec.items()}


def abstract_step(config, mode: str, batch: dict, mesh, *,
                  per_device_loss: bool = True):
  """(jitted step, abstract args): the benchmark's ``build_step`` on
  shapes only.  ``per_device_loss=False``: the loss over the whole batch
  under jit's automatic partitioning (``make_loss_fn`` without a mesh), for
  comparison with the per-device loss training runs."""
  variables = variable_shapes(config)
  if mode == 'infer':
    rules, min_size = shd.rules_from_config(config)
    shardings = shd.tree_shardings(variables, mesh, min_size=min_size,
                                   rules=rules)
    fn = jit_detect_fn(config).jitted
    return fn, (_abstract(variables, shardings), batch['images'],
                batch['img_shapes'], batch['scale_factors'])
  model = build_model(config)
  loss_fn = (make_loss_fn(model, config, mesh=mesh) if per_device_loss else
             make_loss_fn(model, config, num_devices=int(mesh.devices.size)))
  tx, _ = make_optimizer(config, steps_per_epoch=1000)
  abstract = jax.eval_shape(lambda v: state_lib.create_train_state(
      v, tx, jax.random.PRNGKey(0)), variables)
  shardings = state_lib.state_shardings(abstract, mesh, config)
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, tx, compute_dtype=str(
          config.train.compute_dtype)), mesh, shardings)
  return fn, (_abstract(abstract, shardings), batch)


def flops(compiled, platform: str) -> float | None:
  """FLOPs per chip of the compiled step (None when unknown)."""
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    if cost and 'flops' in cost:
      return float(cost['flops'])
  except Exception:  # pylint: disable=broad-except
    pass
  if platform != 'gpu':
    return None
  try:  # the GPU path: the CPU client's analysis of the optimised module
    module = compiled.runtime_executable().hlo_modules()[0]
    cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend('cpu'), module)
    return float(cost.get('flops', 0.0))
  except Exception:  # pylint: disable=broad-except
    return None


def compile_stats(compiled, platform: str, *, lower_s: float,
                  compile_s: float) -> dict:
  """Per-chip memory, FLOPs, HLO lines, collectives and host callbacks."""
  text = compiled.as_text()
  res = dict(lower_s=round(lower_s, 2), compile_s=round(compile_s, 2))
  res.update(hlo_stats.memory_figures(compiled.memory_analysis()))
  f = flops(compiled, platform)
  if f is not None:
    res['gflops'] = round(f / 1e9, 1)
  res['hlo_lines'] = text.count('\n') + 1
  coll = hlo_stats.collectives(text)
  res['collectives'] = coll
  res['collective_gb'] = round(sum(c['bytes'] for c in coll.values()) / GB, 4)
  res['host_callbacks'] = hlo_stats.host_callbacks(text)
  return res


def compile_for_target(config, target: Target, *, mode: str, size,
                       batch_per_chip: int | None = None,
                       batch: int | None = None, hlo_out: str | None = None,
                       compiler_options: dict | None = None,
                       per_device_loss: bool = True) -> dict:
  """Lowers and compiles the step for ``target``; returns the JSON fields.

  The global batch is ``batch_per_chip`` x the mesh's data axis, or
  ``batch`` (which that axis must divide); default 1 image per chip.
  ``compiler_options``: XLA options for this compile (e.g.
  ``{'xla_dump_to': DIR}`` for the buffer assignment); the project sets
  none by default, for any target.  ``per_device_loss``: see
  ``abstract_step``."""
  devices = topology_devices(target)
  mesh = make_mesh(config, devices)
  data = int(mesh.shape[DATA])
  if batch_per_chip is None:
    batch_per_chip = 1 if batch is None else batch // data
    if batch is not None and (batch < 1 or batch % data):
      raise ValueError(f'--batch {batch} is not a positive multiple of the '
                       f'{data} devices of the data axis')
  if batch_per_chip < 1:
    raise ValueError(f'--batch-per-chip must be >= 1, got {batch_per_chip}')
  batch = batch_per_chip * data
  with backend.target_platform(target.platform):
    fn, args = abstract_step(config, mode, abstract_batch(
        config, mode, batch, tuple(size), mesh), mesh,
                             per_device_loss=per_device_loss)
    t = time.perf_counter()
    lowered = fn.lower(*args)
    lower_s = time.perf_counter() - t
  options = dict(compiler_options or {})
  t = time.perf_counter()
  compiled = lowered.compile(compiler_options=options or None)
  compile_s = time.perf_counter() - t
  if hlo_out:
    with open(hlo_out, 'w', encoding='utf-8') as f:
      f.write(compiled.as_text())
  stats = compile_stats(compiled, target.platform, lower_s=lower_s,
                        compile_s=compile_s)
  return dict(config=str(config.name), mode=mode, target=target.spec,
              device_kind=devices[0].device_kind, devices=len(devices),
              batch=batch, batch_per_chip=batch_per_chip, size=list(size),
              compute_dtype=str(config.train.compute_dtype),
              compiler_options={k: str(v) for k, v in options.items()},
              jax=jax.__version__, **stats)
