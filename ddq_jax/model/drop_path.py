"""Stochastic depth (mmcv ``drop_path``) and the reference's per-block
rates, as the Swin backbone uses them."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]
                    ) -> list[float]:
  """Per-block stochastic depth rates: torch.linspace(0, rate, sum(depths))
  in float32, as the reference's ``dpr``."""
  total = int(sum(depths))
  return [float(x) for x in
          np.linspace(0.0, drop_path_rate, total, dtype=np.float32)]


def drop_path(x, *, rate, rng: Optional[jax.Array]):
  """mmcv drop_path: per sample (axis 0) ``x / keep * floor(keep + U)``;
  identity when ``rng`` is None or the rate is a Python 0.  ``rate`` may be
  a traced float32 scalar (a scanned block's): a traced 0 gives
  ``x / 1 * 1``, the same numbers."""
  if rng is None or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  random = keep + jax.random.uniform(rng, shape, x.dtype)
  return x / keep * jnp.floor(random)
