"""The command-line grammar every entry point shares.

    python train.py --config configs/tiny.py --workdir runs/x --config.optim.lr=1e-4
    python -m ddq_jax evaluate --config tiny --weights W --out O --config.eval.batch_size=4

``--config PATH|NAME`` picks a config file (a path, or a name in
``configs/``); ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) overrides
one field, dotted as in the file (``--config.data.canvas_sizes='((640,
640),)'``).  Values are Python literals, except for string fields, which
take the text as it is.  A misspelled key, a value of the wrong type or a
missing config file ends the program with one line naming it (and the
nearest valid key), exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

import ml_collections

from ddq_jax import host_memory
from ddq_jax.config import ConfigError, apply_overrides, config_names, load_config

_OVERRIDE = re.compile(r'^--config\.([A-Za-z_][\w.]*)(?:=(.*))?$', re.S)

OVERRIDE_HELP = (
    'Any config field can be overridden: --config.KEY=VALUE (dotted, e.g. '
    '--config.optim.lr=1e-4 --config.data.canvas_sizes="((640, 640),)"); '
    'values are Python literals, string fields take the text as it is.')


def add_config_argument(parser: argparse.ArgumentParser, *,
                        required: bool = False, help_text: str = '') -> None:
  """Adds ``--config PATH|NAME``; ``--config.KEY=VALUE`` is parsed by
  ``parse_args``.  The help lists the bundled config names."""
  names = ', '.join(config_names()) or 'none found'
  parser.add_argument(
      '--config', required=required, metavar='PATH|NAME',
      help=(help_text + ' ' if help_text else '') +
      f'config file or bundled name ({names}). ' + OVERRIDE_HELP)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """(the other arguments, {dotted key: raw value}) from a command line."""
  rest, overrides = [], {}
  argv = list(argv)
  i = 0
  while i < len(argv):
    m = _OVERRIDE.match(argv[i])
    if not m:
      rest.append(argv[i])
      i += 1
      continue
    key, value = m.group(1), m.group(2)
    if value is None:
      if i + 1 >= len(argv):
        raise ConfigError(f'--config.{key}: expected a value '
                          f'(--config.{key}=VALUE)')
      value = argv[i + 1]
      i += 1
    overrides[key] = value
    i += 1
  return rest, overrides


def fail(parser: argparse.ArgumentParser, message: str) -> None:
  """Ends the program with one line on stderr and exit status 2."""
  parser.exit(2, f'{parser.prog}: error: {message}\n')


def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]] = None
               ) -> tuple[argparse.Namespace, dict[str, str]]:
  """``parser.parse_args`` plus the ``--config.KEY=VALUE`` overrides.

  Every command starts here, so this is also where a command's process
  keeps the host memory it frees for its next step
  (``host_memory.keep_freed_memory``)."""
  host_memory.keep_freed_memory()
  argv = sys.argv[1:] if argv is None else argv
  try:
    rest, overrides = split_overrides(argv)
  except ConfigError as e:
    fail(parser, str(e))
  return parser.parse_args(rest), overrides


def load_or_fail(parser: argparse.ArgumentParser, name_or_path: str,
                 overrides: dict) -> ml_collections.ConfigDict:
  """``load_config`` with the overrides; a mistake ends the program."""
  try:
    return load_config(name_or_path, overrides)
  except ConfigError as e:
    fail(parser, str(e))


def override_or_fail(parser: argparse.ArgumentParser,
                     config: ml_collections.ConfigDict,
                     overrides: dict) -> ml_collections.ConfigDict:
  """Applies overrides to a config that came with weights."""
  try:
    apply_overrides(config, overrides)
  except ConfigError as e:
    fail(parser, str(e))
  return config
