"""Device mesh with axes ('data', 'model') from ``config.mesh``.

``config.mesh.data = -1`` takes every device not used by the model axis.
Axes are ``AxisType.Auto`` (classic automatic partitioning: jit with
NamedShardings, XLA inserts the collectives); jax 0.10's ``make_mesh``
otherwise defaults to explicit axes.
"""
from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

DATA, MODEL = 'data', 'model'


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
  """(data, model) sizes for ``num_devices`` devices (config None: every
  device on 'data')."""
  data, model = ((int(config.mesh.data), int(config.mesh.model))
                 if config is not None else (-1, 1))
  if model < 1 or num_devices % model:
    raise ValueError(f'mesh.model={model} does not divide {num_devices} devices')
  if data == -1:
    data = num_devices // model
  if data * model != num_devices:
    raise ValueError(f'mesh data={data} x model={model} != {num_devices} devices')
  return data, model


def make_mesh(config=None, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A 2-D mesh ('data', 'model') over ``devices`` (default: all, every
  process's).  Device order follows ``jax.make_mesh`` (topology aware).
  Training, evaluation and the benchmark all run on such a mesh."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, (DATA, MODEL),
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)
