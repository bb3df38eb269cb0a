"""Serving a trained detector: the ``Detector`` API, the jitted predict
function, the ``predict`` command and ``export`` (jax.export, ONNX)."""
