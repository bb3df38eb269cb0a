"""Compile targets for a machine without the accelerator ("deviceless").

    tpu:<topology>          any libtpu topology name: tpu:v5e:2x4, tpu:v4:2x2x1,
                            tpu:v5p:2x2x1, tpu:v6e:2x4, ...
    gpu:<chip>[:<count>]    chip h100 | h200 | a100; count = devices on one
                            host (8) or HOSTSxDEVICES (2x8); default 8

XLA's TPU compiler comes with libtpu (``pip install 'ddq-jax[tpu]'``), its
NVIDIA GPU compiler with the jax CUDA plugin (``'ddq-jax[cuda]'``).  A GPU
compile also needs the chip's ``GpuTargetConfigProto`` (``gpu_targets/``,
taken from XLA's ``xla/backends/gpu/target_config/specs/``; jaxlib 0.10's
proto has no ``collective_memory_granularity`` field, so that line is
left out; the H100 file is the H200 one with the H100's memory, bandwidth
and name).  Both compilers run with JAX's CPU client as the only runtime
platform (``jax_platforms='cpu'``): the CUDA plugin otherwise looks for a
driver and is not registered.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax
from jax.experimental import topologies

GPU_CHIPS = {'h100': 'h100.pbtxt', 'h200': 'h200.pbtxt', 'a100': 'a100.pbtxt'}
FORMS = ("'tpu:<topology>' (e.g. tpu:v5e:2x4, tpu:v4:2x2x1, tpu:v6e:2x4) or "
         "'gpu:<chip>[:<count>]' (chip " + ' | '.join(GPU_CHIPS) +
         "; count 8 or HOSTSxDEVICES, e.g. gpu:h100:8, gpu:h200:2x8)")
_TPU_TOPOLOGY = re.compile(r'^v\d+[a-z]*(?::\d+(?:x\d+)+|-\d+)$')
_GPU_COUNT = re.compile(r'^(?:(\d+)x)?(\d+)$')
_GPU_TARGETS = os.path.join(os.path.dirname(__file__), 'gpu_targets')


class TargetError(ValueError):
  """A --target string, or a missing compiler, in one line."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed target: ``platform`` 'tpu' or 'gpu'; ``name`` the TPU
  topology or the GPU chip; ``hosts`` x ``per_host`` GPU devices."""
  spec: str
  platform: str
  name: str
  hosts: int = 1
  per_host: int = 0


def parse_target(spec: str) -> Target:
  """'tpu:v5e:2x4' / 'gpu:h100:8' -> Target; TargetError names the forms."""
  kind, _, rest = (spec or '').strip().partition(':')
  kind = kind.lower()
  if kind == 'tpu' and _TPU_TOPOLOGY.match(rest):
    return Target(spec, 'tpu', rest)
  if kind == 'gpu':
    chip, _, count = rest.lower().partition(':')
    m = _GPU_COUNT.match(count or '8')
    if chip in GPU_CHIPS and m and int(m.group(2)) > 0:
      return Target(spec, 'gpu', chip, hosts=int(m.group(1) or 1),
                    per_host=int(m.group(2)))
  raise TargetError(f'--target {spec!r}: expected {FORMS}')


def gpu_target_config(chip: str) -> str:
  """The shipped GpuTargetConfigProto text of ``chip``."""
  with open(os.path.join(_GPU_TARGETS, GPU_CHIPS[chip]), encoding='utf-8') as f:
    return f.read()


def _have(*modules: str) -> bool:
  for m in modules:
    try:
      if importlib.util.find_spec(m) is not None:
        return True
    except ImportError:  # a dotted name whose parent is missing
      pass
  return False


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else repr(e)


def use_cpu_runtime() -> None:
  """The CPU client as the only runtime platform (call before any backend
  is initialised; harmless after, when it already is the CPU)."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  # Nothing here opens a TPU: a second deviceless compile (or one beside a
  # job that holds the chips) must not stop at libtpu's process lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  jax.config.update('jax_platforms', 'cpu')


def topology_devices(target: Target) -> list:
  """The target's devices (no runtime behind them), in topology order."""
  if target.platform == 'tpu':
    if not _have('libtpu'):
      raise TargetError(f"--target {target.spec}: libtpu is not installed "
                        "(pip install 'ddq-jax[tpu]')")
    try:
      topo = topologies.get_topology_desc(topology_name=target.name,
                                          platform='tpu')
    except Exception as e:  # pylint: disable=broad-except
      raise TargetError(f'--target {target.spec}: libtpu could not build '
                        f'topology {target.name!r} ({_first_line(e)})'
                        ) from None
    return list(topo.devices)
  if not _have('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_plugins.xla_cuda12',
               'jax_plugins.xla_cuda13'):
    raise TargetError(f"--target {target.spec}: the jax CUDA plugin is not "
                      "installed (pip install 'ddq-jax[cuda]')")
  try:
    topo = topologies.get_topology_desc(
        platform='cuda', topology=f'1x{target.hosts}x{target.per_host}',
        target_config=gpu_target_config(target.name))
  except Exception as e:  # pylint: disable=broad-except
    raise TargetError(f'--target {target.spec}: no CUDA topology '
                      f'({_first_line(e)})') from None
  return list(topo.devices)
