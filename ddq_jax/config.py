"""Loading configs: Python files in ``configs/`` with ``get_config()``, and
dotted ``KEY=VALUE`` overrides checked against the config's own fields.

    config = load_config('tiny', {'optim.lr': 1e-4})
    config = load_config('configs/ddq_r50_4scale.py')
    config = complete_config(json.load(f), source='run/config.json')

The schema is ``default_config(backbone_type)``: the published R50 recipe
(``configs/ddq_r50_4scale.py``, which declares every field the code reads)
with the backbone section of the backbone type (``configs/
ddq_swinl_4scale.py``'s for 'swin').  Every config, a config file's or one
stored with weights, is merged onto it (``complete_config``): a missing
field takes its default, an unknown one is an error, so the code reads
every field directly and every field can be set from the command line.

Every mistake is a ``ConfigError`` whose message is one line naming the bad
key or file and what was expected (the nearest valid key for a typo), so
the command-line entry points (``ddq_jax/cli.py``) print it as it is.
"""
from __future__ import annotations

import ast
import copy
import difflib
import functools
import importlib.util
import os
from typing import Any, Iterator

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')
# The schema's files (in CONFIG_DIR): the whole R50 recipe, and the recipe
# whose backbone section is the default of each other backbone type.
SCHEMA_FILE = 'ddq_r50_4scale.py'
BACKBONE_SCHEMA_FILES = {'resnet': SCHEMA_FILE, 'swin': 'ddq_swinl_4scale.py'}
BACKBONE_TYPES = tuple(BACKBONE_SCHEMA_FILES)
# Fields whose default depends on the backbone type (taken from its file).
_BACKBONE_FIELDS = ('backbone', 'padding_invariant')


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
  config = complete_config(_run_config_file(path), source=path)
  apply_overrides(config, overrides or {})
  return config


def _run_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file, as it is (not merged)."""
  spec = importlib.util.spec_from_file_location('_ddq_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path}: no get_config() function')
  return module.get_config()


@functools.lru_cache(maxsize=None)
def _schema(backbone_type: str) -> dict:
  config = _run_config_file(os.path.join(CONFIG_DIR, SCHEMA_FILE)).to_dict()
  if backbone_type != 'resnet':
    other = _run_config_file(os.path.join(
        CONFIG_DIR, BACKBONE_SCHEMA_FILES[backbone_type])).to_dict()
    config.update({k: other[k] for k in _BACKBONE_FIELDS})
  return config


def default_config(backbone_type: str = 'resnet'
                   ) -> ml_collections.ConfigDict:
  """The schema: every config field at its default.

  Args:
    backbone_type: one of ``BACKBONE_TYPES``; chooses the ``backbone``
      section (and ``padding_invariant``).
  Returns:
    a new ConfigDict: the R50 recipe with that backbone's fields.
  """
  if backbone_type not in BACKBONE_TYPES:
    raise ConfigError(f'config field \'backbone.type\' is {backbone_type!r}: '
                      f'expected one of {BACKBONE_TYPES}')
  return ml_collections.ConfigDict(copy.deepcopy(_schema(backbone_type)))


def _tuples(value: Any) -> Any:
  """Lists (JSON's tuples) back to tuples, dicts and ConfigDicts to dicts."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def complete_config(config: Any, *, source: str = ''
                    ) -> ml_collections.ConfigDict:
  """``config`` (a ConfigDict, or a dict such as a stored config.json's)
  merged onto ``default_config`` of its backbone type.

  Args:
    config: a whole or partial config; a field it lacks takes its default.
    source: what to name in errors (a file path).
  Returns:
    a new, complete ConfigDict.
  Raises:
    ConfigError: a field the schema lacks (named, with the nearest valid
      key) or a value of another type than the field's.
  """
  data = _tuples(config)
  if not isinstance(data, dict):
    raise ConfigError(f'{source or "config"}: expected a mapping, got '
                      f'{type(config).__name__}')
  backbone = data['backbone'] if isinstance(data.get('backbone'), dict) \
      else {}
  kind = str(backbone['type']).lower() if 'type' in backbone else 'resnet'
  merged = default_config(kind)
  _merge(merged, data, '', f'{source}: ' if source else '', merged)
  merged.backbone.type = kind
  return merged


def _merge(node: ml_collections.ConfigDict, data: dict, prefix: str,
           source: str, root: ml_collections.ConfigDict) -> None:
  for key, value in data.items():
    dotted = f'{prefix}{key}'
    if key not in node:
      raise ConfigError(f'{source}config has no field {dotted!r}'
                        f'{_nearest(dotted, list(config_keys(root)))}')
    if isinstance(node[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ConfigError(f'{source}config field {dotted!r} is a section; '
                          f'got {type(value).__name__} {value!r}')
      _merge(node[key], value, f'{dotted}.', source, root)
    else:
      _set(node, key, value, value, dotted, prefix=source)


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
    _set(node, leaf, parse_value(raw, node[leaf]), raw, key)


def _set(node: ml_collections.ConfigDict, leaf: str, value: Any, raw: Any,
         key: str, prefix: str = '') -> None:
  """node[leaf] = value, checked against (and converted to) its type."""
  current = node[leaf]
  if not _type_ok(value, current):
    raise ConfigError(
        f'{prefix}config field {key!r} is a {type(current).__name__} '
        f'(now {current!r}); got {type(value).__name__} {raw!r}')
  if isinstance(current, float) and isinstance(value, int) and \
      not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f'{prefix}config field {key!r}: cannot set {raw!r}: '
                      f'{e}') from None
