"""Our converted-checkpoint format: a directory with the variables and config.

    OUT/variables.msgpack   flax.serialization msgpack of {'params', 'batch_stats'}
    OUT/config.json         the model config (ml_collections, JSON)

Written atomically: everything goes to a temporary sibling directory that is
renamed into place, so a crash never leaves a half-written checkpoint.  A
non-empty directory that is not a previous conversion, or an existing file,
is refused (no user file is ever deleted; see ``check_output_dir``).
Temporary directories left by a killed conversion (``.tmp-OUT.<pid>.*``
of a process that is gone, holding only our files) are removed by the next
conversion into the same place.  Non-finite weights are refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

from flax import serialization
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddq_jax.config import complete_config
from ddq_jax.io.conversion.mapping import stack_layers
from ddq_jax.io.outputs import pid_alive
from ddq_jax.tree_paths import flat_items, path_str

VARIABLES_FILE = 'variables.msgpack'
CONFIG_FILE = 'config.json'


OUR_FILES = (VARIABLES_FILE, CONFIG_FILE, 'conversion.json')
# The variable collections weights hold.
COLLECTIONS = ('params', 'batch_stats')


class OutputExistsError(ValueError):
  """``--out`` holds something a conversion must not replace."""


def _is_previous_conversion(path: str) -> bool:
  names = set(os.listdir(path))
  return VARIABLES_FILE in names and names <= set(OUR_FILES)


def check_output_dir(out_dir: str, *, overwrite: bool = False,
                     inputs=()) -> str:
  """Decides how ``out_dir`` will be written, before any work is done.

  Returns:
    'new' (absent or an empty directory), 'replace' (a previous conversion:
    only our files, swapped for the new ones), or 'into' (``overwrite``: a
    non-empty directory keeps its other files; only ours are replaced).
  Raises:
    OutputExistsError: ``out_dir`` is a file, a non-empty directory that is
      not a previous conversion (without ``overwrite``), or writing it would
      replace one of ``inputs``.
  """
  out_dir = os.path.abspath(out_dir)
  targets = {os.path.realpath(os.path.join(out_dir, n)) for n in OUR_FILES}
  for src in inputs:
    real = os.path.realpath(src)
    if real in targets or real == os.path.realpath(out_dir):
      raise OutputExistsError(
          f'--out {out_dir}: writing it would replace the input {src}; '
          'choose another output directory')
  if not os.path.lexists(out_dir):
    return 'new'
  if not os.path.isdir(out_dir):
    raise OutputExistsError(
        f'--out {out_dir} is an existing file, not a directory; nothing was '
        'written (choose a directory path)')
  if not os.listdir(out_dir):
    return 'new'
  if _is_previous_conversion(out_dir):
    return 'replace'
  if overwrite:
    return 'into'
  raise OutputExistsError(
      f'--out {out_dir} is a non-empty directory that is not a previous '
      f'conversion ({len(os.listdir(out_dir))} entries); nothing was written. '
      'Choose a new directory, or pass --overwrite to write '
      f'{", ".join(OUR_FILES)} into it (its other files are kept)')


def stale_temporaries(parent: str, base: str) -> list[str]:
  """Temporary directories of earlier conversions into ``parent/base`` that
  no live process owns and that hold only our files: ``.tmp-BASE.<pid>.*``
  / ``.old-BASE.<pid>.*`` of a dead pid, or the older ``.tmp-BASE*`` naming
  (no pid)."""
  pattern = re.compile(r'^\.(?:tmp|old)-' + re.escape(base)
                       + r'(?:\.(\d+)\.[^.]+|[A-Za-z0-9_]{8})$')
  out = []
  for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
    m = pattern.match(name)
    path = os.path.join(parent, name)
    if not m or not os.path.isdir(path) or os.path.islink(path):
      continue
    if m.group(1) and pid_alive(int(m.group(1))):
      continue
    if set(os.listdir(path)) <= set(OUR_FILES):
      out.append(path)
  return out


def _temp_dir(parent: str, kind: str, base: str) -> str:
  return tempfile.mkdtemp(prefix=f'.{kind}-{base}.{os.getpid()}.', dir=parent)


def save_converted(out_dir: str, variables: dict,
                   config: ml_collections.ConfigDict,
                   extra: dict | None = None, *, overwrite: bool = False,
                   inputs=()) -> None:
  """Atomically writes ``variables`` and ``config`` into ``out_dir``.

  Everything is written to a temporary sibling directory first.  Absent or
  empty ``out_dir``: that directory is renamed into place.  A previous
  conversion (only our files): swapped for the new one, then the old copy is
  removed.  Anything else needs ``overwrite`` and then only our files inside
  it are replaced (each by a rename); no other file is ever deleted, and
  ``inputs`` (the source checkpoint) are never touched (see
  ``check_output_dir``).
  """
  out_dir = os.path.abspath(out_dir)
  mode = check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)
  bad = nonfinite_paths(variables)
  if bad:
    raise ValueError(
        f'{len(bad)} tensors hold NaN or infinite values (first: '
        f'{", ".join(bad[:3])}); nothing was written to {out_dir}')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(out_dir)
  for stale in stale_temporaries(parent, base):
    shutil.rmtree(stale, ignore_errors=True)
  tmp = _temp_dir(parent, 'tmp', base)
  try:
    numpy_tree = _to_numpy(variables)
    with open(os.path.join(tmp, VARIABLES_FILE), 'wb') as f:
      f.write(serialization.msgpack_serialize(numpy_tree))
      f.flush()
      os.fsync(f.fileno())
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
    if extra:
      with open(os.path.join(tmp, 'conversion.json'), 'w') as f:
        json.dump(extra, f, indent=1)
    if mode == 'new':
      if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked); rmdir refuses anything else
      os.rename(tmp, out_dir)
    elif mode == 'replace':
      old = _temp_dir(parent, 'old', base)
      os.rmdir(old)
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      for name in os.listdir(old):  # only our files (checked)
        os.remove(os.path.join(old, name))
      os.rmdir(old)
    else:  # 'into': replace our files one by one, keep the rest
      for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
      os.rmdir(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def flatten(variables: dict) -> dict[str, Any]:
  """{'params/a/b': leaf, ...} of the ``COLLECTIONS`` of a variables tree."""
  return {path_str((coll,) + path): leaf for coll in COLLECTIONS
          if coll in variables
          for path, leaf in flat_items(variables[coll])}


def is_floating(x) -> bool:
  return jnp.issubdtype(np.asarray(x).dtype, jnp.floating)


def nonfinite_paths(variables: dict) -> list[str]:
  """Paths of the floating leaves holding a NaN or an infinity."""
  return [p for p, x in flatten(variables).items()
          if is_floating(x) and not np.all(np.isfinite(
              np.asarray(x, np.float32)))]


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def load_config_json(path: str) -> ml_collections.ConfigDict:
  """A config.json merged onto the defaults (``complete_config``: a field
  it lacks takes its default); a file that is not a JSON object is a
  ValueError naming it, an unknown field a ConfigError."""
  with open(path) as f:
    try:
      data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{path}: not a JSON config ({e}); restore it from '
                       'the run or conversion that wrote it') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object (a config), got '
                     f'{type(data).__name__}')
  return complete_config(data, source=path)


def load_converted(weights_dir: str) -> tuple[dict, ml_collections.ConfigDict]:
  """Reads a directory written by ``save_converted``: (variables, config),
  the variables in the stacked layout (``mapping.stack_layers``: files
  written per layer load too)."""
  var_path = os.path.join(weights_dir, VARIABLES_FILE)
  cfg_path = os.path.join(weights_dir, CONFIG_FILE)
  if not os.path.isfile(var_path):
    raise FileNotFoundError(
        f'{weights_dir}: no {VARIABLES_FILE}; expected a directory written by '
        'convert_weights.py (run it on the mmdetection .pth first)')
  with open(var_path, 'rb') as f:
    try:
      variables = serialization.msgpack_restore(f.read())
    except Exception as e:
      raise ValueError(f'{var_path}: unreadable ({e}); the file is truncated '
                       'or not a ddq-jax checkpoint') from None
  config = load_config_json(cfg_path) if os.path.isfile(cfg_path) else None
  # Weights converted before layers were stored stacked: converted here.
  return stack_layers(variables), config
