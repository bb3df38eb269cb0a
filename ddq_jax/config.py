"""Loading configs: Python files in ``configs/`` with ``get_config()``."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')


def load_config(path_or_name: str, overrides: dict | None = None, *,
                config_dir: str | None = None) -> ml_collections.ConfigDict:
  """Loads ``configs/<name>.py`` (or any path) and applies dotted overrides.

  Args:
    path_or_name: a file path, or a bare name such as ``'tiny'``.
    overrides: {'num_queries': 300, 'optim.lr': 1e-4, ...}.
    config_dir: where bare names are looked up (default: the repository's
      ``configs/``); config files pass their own folder to build on a sibling.
  """
  path = path_or_name
  config_dir = config_dir or CONFIG_DIR
  if not os.path.exists(path):
    candidate = os.path.join(config_dir, f'{path_or_name}.py')
    if not os.path.exists(candidate):
      known = sorted(f[:-3] for f in os.listdir(config_dir) if f.endswith('.py'))
      raise FileNotFoundError(
          f'config {path_or_name!r} not found: expected a file path or one of '
          f'{known}')
    path = candidate
  spec = importlib.util.spec_from_file_location('_ddq_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  apply_overrides(config, overrides or {})
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets dotted fields in place: {'optim.lr': 1e-4}.  Unknown fields are an
  error naming the field."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f'config has no field {key!r}')
    node[leaf] = value
