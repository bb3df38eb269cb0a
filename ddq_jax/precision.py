"""Mixed precision: one object for training, inference and module dtypes.

``Precision.from_config(config)`` reads ``train.compute_dtype``: the dtype
the parameters and images are cast to inside the training step, and the
dtype of the modules that compute in it (the deformable encoder).  Master
parameters, gradients, optimiser state and the loss stay float32
(``param_dtype``).  Inference takes its own (``Precision('bfloat16')`` for
``Detector(dtype='bfloat16')``) and casts with the same ``cast``.

    precision = Precision.from_config(config)
    params = precision.cast(params)      # float leaves -> compute dtype
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ('float32', 'bfloat16')


def cast_floats(tree: Any, dtype) -> Any:
  """Every floating leaf of ``tree`` as ``dtype`` (others unchanged)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


@dataclasses.dataclass(frozen=True)
class Precision:
  """Attributes:
    compute_dtype: 'float32' or 'bfloat16': parameters and activations
      inside the step (or the inference function).
    param_dtype: the stored (master) parameters' dtype.
  """
  compute_dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    if str(self.compute_dtype) not in COMPUTE_DTYPES:
      raise ValueError(f'compute dtype {self.compute_dtype!r}: expected one '
                       f'of {COMPUTE_DTYPES}')

  @classmethod
  def from_config(cls, config) -> 'Precision':
    """The training precision of ``config`` (``train.compute_dtype``)."""
    return cls(compute_dtype=str(config.train.compute_dtype))

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.compute_dtype)

  @property
  def mixed(self) -> bool:
    """Whether the computation runs in another dtype than the parameters."""
    return self.dtype != jnp.dtype(self.param_dtype)

  @property
  def module_dtype(self) -> Optional[jnp.dtype]:
    """The ``dtype`` of the modules that compute in the compute dtype
    (None: flax's default, the inputs' promoted dtype)."""
    return self.dtype if self.mixed else None

  def cast(self, tree: Any) -> Any:
    """``tree``'s floating leaves in the compute dtype (a no-op when not
    mixed)."""
    return cast_floats(tree, self.dtype) if self.mixed else tree
