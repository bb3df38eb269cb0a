"""Deviceless compiles for TPU and NVIDIA GPU targets (``targets.py``,
``deviceless.py``, ``hlo_stats.py``)."""
