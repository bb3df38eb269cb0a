"""DDQ-DETR in JAX/Flax, numerically faithful to mmdetection 3.3.0."""
__version__ = '0.1.0'
