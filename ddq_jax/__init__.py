"""DDQ-DETR in JAX/Flax, numerically faithful to mmdetection 3.3.0.

    from ddq_jax import Detector     # imported on first use (jax, flax)
    from ddq_jax import WeightsMismatchError   # weights that do not fit
"""
__version__ = '0.1.0'

__all__ = ['Detector', 'WeightsMismatchError']


def __getattr__(name):
  if name == 'Detector':
    from ddq_jax.serve.api import Detector  # pylint: disable=g-import-not-at-top
    return Detector
  if name == 'WeightsMismatchError':
    from ddq_jax.io.weights_fit import WeightsMismatchError  # pylint: disable=g-import-not-at-top
    return WeightsMismatchError
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
