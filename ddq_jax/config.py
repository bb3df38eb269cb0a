"""Loading configs: Python files in ``configs/`` with ``get_config()``, and
dotted ``KEY=VALUE`` overrides checked against the config's own fields.

    config = load_config('tiny', {'optim.lr': 1e-4})
    config = load_config('configs/ddq_r50_4scale.py')

Every mistake is a ``ConfigError`` whose message is one line naming the bad
key or file and what was expected (the nearest valid key for a typo), so
the command-line entry points (``ddq_jax/cli.py``) print it as it is.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterator

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')


class ConfigError(ValueError):
  """A missing config file, an unknown key or a value of the wrong type."""


def config_names(config_dir: str | None = None) -> list[str]:
  """The bare names ``load_config`` accepts (``configs/*.py``)."""
  config_dir = config_dir or CONFIG_DIR
  if not os.path.isdir(config_dir):
    return []
  return sorted(f[:-3] for f in os.listdir(config_dir)
                if f.endswith('.py') and not f.startswith('_'))


def load_config(path_or_name: str, overrides: dict | None = None, *,
                config_dir: str | None = None) -> ml_collections.ConfigDict:
  """Loads ``configs/<name>.py`` (or any path) and applies dotted overrides.

  Args:
    path_or_name: a file path, or a bare name such as ``'tiny'``.
    overrides: {'num_queries': 300, 'optim.lr': 1e-4, ...}; values may be
      Python objects or the strings of the command line (``'1e-4'``).
    config_dir: where bare names are looked up (default: the repository's
      ``configs/``); config files pass their own folder to build on a sibling.
  """
  path = path_or_name
  config_dir = config_dir or CONFIG_DIR
  if not os.path.isfile(path):
    candidate = os.path.join(config_dir, f'{path_or_name}.py')
    if not os.path.isfile(candidate):
      known = config_names(config_dir)
      near = difflib.get_close_matches(
          os.path.splitext(os.path.basename(path_or_name))[0], known, n=1)
      hint = f'; did you mean {near[0]!r}?' if near else ''
      raise ConfigError(
          f'config {path_or_name!r} not found: expected a file path or one of '
          f'{known}{hint}')
    path = candidate
  spec = importlib.util.spec_from_file_location('_ddq_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path}: no get_config() function')
  config = module.get_config()
  apply_overrides(config, overrides or {})
  return config


def config_keys(config: Any, prefix: str = '') -> Iterator[str]:
  """Every dotted leaf key of a (nested) ConfigDict."""
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from config_keys(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


def _nearest(key: str, keys: list[str]) -> str:
  near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
  if not near:  # a misspelled section: match the last part alone
    leaf = key.rsplit('.', 1)[-1]
    near = [k for k in keys if k.rsplit('.', 1)[-1] == leaf][:1]
  return f'; did you mean {near[0]!r}?' if near else ''


def parse_value(raw: Any, current: Any) -> Any:
  """A command-line string as the type of the field it replaces: strings
  stay strings, everything else is a Python literal (``1e-4``, ``True``,
  ``((800, 1344),)``)."""
  if not isinstance(raw, str) or isinstance(current, str):
    return raw
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _type_ok(value: Any, current: Any) -> bool:
  if current is None or value is None:
    return True
  if isinstance(current, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(current, bool)
  if isinstance(current, float):
    return isinstance(value, (int, float))
  if isinstance(current, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(current))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets dotted fields in place: {'optim.lr': 1e-4}.  An unknown field or a
  value of another type than the field's is a ``ConfigError`` naming it (and
  the nearest valid key)."""
  keys = None
  for key, raw in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    ok = True
    for p in parents:
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        ok = False
        break
      node = node[p]
    if not ok or not isinstance(node, ml_collections.ConfigDict) or \
        leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      keys = keys or list(config_keys(config))
      raise ConfigError(f'config has no field {key!r}{_nearest(key, keys)}')
    current = node[leaf]
    value = parse_value(raw, current)
    if not _type_ok(value, current):
      raise ConfigError(
          f'config field {key!r} is a {type(current).__name__} '
          f'(now {current!r}); got {type(value).__name__} {raw!r}')
    if isinstance(current, float) and isinstance(value, int):
      value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f'config field {key!r}: cannot set {raw!r}: '
                        f'{e}') from None
