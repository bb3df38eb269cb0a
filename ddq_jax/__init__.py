"""DDQ-DETR in JAX/Flax, numerically faithful to mmdetection 3.3.0.

    from ddq_jax import Detector
    from ddq_jax import WeightsMismatchError   # weights that do not fit
"""
from ddq_jax.io.weights_fit import WeightsMismatchError
from ddq_jax.serve.api import Detector

__version__ = '0.1.0'

__all__ = ['Detector', 'WeightsMismatchError']
