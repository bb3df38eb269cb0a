"""Measuring: the ``benchmark`` command, profiling hot spots, and deviceless
compiles for TPUs and GPUs."""
