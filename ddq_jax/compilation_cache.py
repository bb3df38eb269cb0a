"""The persistent XLA compilation cache, on by default for every entry point.

A compiled step is written to disk and reused by the next run of the same
command (same model, shapes, flags, JAX version and device), so a restart
of ``train.py``, ``evaluate``, ``predict`` or ``benchmark`` skips the
minutes of XLA compilation of the R50 training step.

Where it lives, first match wins:

1. ``DDQ_JAX_COMPILATION_CACHE=off`` (or ``0`` / ``false`` / ``no``): no
   cache; any other value of it is the cache directory;
2. ``JAX_COMPILATION_CACHE_DIR`` (JAX's own variable), if set;
3. ``$XDG_CACHE_HOME/ddq_jax/jax``, else ``~/.cache/ddq_jax/jax``.

``python -m ddq_jax benchmark --no-compilation-cache`` turns it off for one
run.  Deleting the directory is always safe.

``compile_count(fn)`` is the one compile counter: every "compiles once"
check (the training step, the detect program of evaluation, ``Detector``
and the tests) reads it.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax

ENV = 'DDQ_JAX_COMPILATION_CACHE'
_OFF = ('off', '0', 'false', 'no', 'none', '')


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/ddq_jax/jax`` or ``~/.cache/ddq_jax/jax``."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ddq_jax', 'jax')


def cache_dir_from_env() -> Optional[str]:
  """The directory the environment asks for; None when turned off."""
  value = os.environ.get(ENV)
  if value is not None:
    return None if value.strip().lower() in _OFF else value
  jax_dir = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if jax_dir is not None:
    return jax_dir or None
  return default_cache_dir()


def enable_compilation_cache(enabled: bool = True) -> Optional[str]:
  """Points JAX's persistent compilation cache at the directory above
  (created if missing) and returns it; None (and the cache off) when
  ``enabled`` is False or the environment turns it off.

  Entries are written for compilations that take at least 1 s, so small
  helper functions do not fill the directory."""
  path = cache_dir_from_env() if enabled else None
  if path is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise SystemExit(f'compilation cache directory {path!r} cannot be '
                     f'created ({e}); set {ENV}=off or another directory')
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path


def compile_count(fn: Any) -> int:
  """Executables a jitted function holds: one per input signature (shapes,
  dtypes, shardings) it was called with, however it was compiled (XLA or a
  hit in the persistent cache).  ``fn``: a ``jax.jit`` function or a
  wrapper exposing one as ``fn.jitted`` (``serve.detect.jit_detect_fn``)
  or its own ``compile_count()`` (``train.step.CompiledSteps``)."""
  if hasattr(fn, 'compile_count'):  # train.step.CompiledSteps
    return int(fn.compile_count())
  jitted = getattr(fn, 'jitted', fn)
  return int(jitted._cache_size())  # pylint: disable=protected-access
