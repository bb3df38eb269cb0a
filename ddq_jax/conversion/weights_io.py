"""Our converted-checkpoint format: a directory with the variables and config.

    OUT/variables.msgpack   flax.serialization msgpack of {'params', 'batch_stats'}
    OUT/config.json         the model config (ml_collections, JSON)

Written atomically: everything goes to a temporary sibling directory that is
renamed into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import ml_collections
import numpy as np
from flax import serialization

VARIABLES_FILE = 'variables.msgpack'
CONFIG_FILE = 'config.json'


def save_converted(out_dir: str, variables: dict,
                   config: ml_collections.ConfigDict,
                   extra: dict | None = None) -> None:
  """Atomically writes ``variables`` and ``config`` into ``out_dir``."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-' + os.path.basename(out_dir), dir=parent)
  try:
    numpy_tree = _to_numpy(variables)
    with open(os.path.join(tmp, VARIABLES_FILE), 'wb') as f:
      f.write(serialization.msgpack_serialize(numpy_tree))
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
    if extra:
      with open(os.path.join(tmp, 'conversion.json'), 'w') as f:
        json.dump(extra, f, indent=1)
    if os.path.exists(out_dir):
      old = out_dir + '.old'
      shutil.rmtree(old, ignore_errors=True)
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def _tuples(value):
  """JSON lists back to tuples (configs hold tuples)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_config_json(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def load_converted(weights_dir: str) -> tuple[dict, ml_collections.ConfigDict]:
  """Reads a directory written by ``save_converted``: (variables, config)."""
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
  return variables, config
