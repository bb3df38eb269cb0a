"""Do the weights fit the model they are loaded into?  One check for every
entry point (``weights.load_weights``: predict, evaluate, export, the
``Detector`` and ``train.init_from``) and every weight format.

    problems = fit_problems(variables, config)   # pure: what does not fit
    variables = check_fit(variables, config, source='weights/r50',
                          stored_config=its_own_config)

The model's variables for ``config`` are ``jax.eval_shape`` of its init
(``models.variables.variable_shapes``: no compute).  A tensor the model
needs but the weights lack (missing), one the model has no place for
(unexpected) or one of another shape (mis-shaped) is a
``WeightsMismatchError``: one line naming the first few and the config
fields that differ from the weights' own config.  Non-finite weights are
refused too.  ``allow_partial`` (``train.init_from_partial``: fine-tuning
with, say, another class count) drops the unexpected and mis-shaped
tensors instead, and says which.
"""
from __future__ import annotations

import functools
import json
import logging
from typing import Any

import numpy as np

from ddq_jax.config import complete_config
from ddq_jax.io.conversion.weights_io import flatten, nonfinite_paths
from ddq_jax.model.variables import variable_shapes
from ddq_jax.train import integrity
from ddq_jax.tree_paths import nest, split

log = logging.getLogger('ddq_jax.io.weights')

# Config sections that never change a variable's shape.
_NOT_ARCHITECTURE = ('train.', 'optim.', 'eval.', 'data.', 'mesh.', 'loss.',
                     'name')
SHOWN = 3


class WeightsMismatchError(ValueError):
  """Weights that do not fit the model of the config (or are not finite)."""


def fit_problems(variables: dict, want: dict[str, tuple]) -> dict:
  """{'missing', 'unexpected', 'misshaped'} of ``variables`` against
  ``want`` ({path: shape}); 'misshaped' holds (path, got, wanted)."""
  have = {p: tuple(np.shape(x)) for p, x in flatten(variables).items()}
  return dict(
      missing=sorted(set(want) - set(have)),
      unexpected=sorted(set(have) - set(want)),
      misshaped=sorted((p, have[p], want[p]) for p in set(have) & set(want)
                       if have[p] != want[p]))


def expected_shapes(config) -> dict[str, tuple]:
  """{path: shape} of every variable the model of ``config`` creates
  (traced once per distinct config in a process: a few seconds for R50)."""
  return dict(_expected_shapes(config.to_json_best_effort()))


@functools.lru_cache(maxsize=8)
def _expected_shapes(config_json: str) -> tuple:
  config = complete_config(json.loads(config_json))
  return tuple((p, tuple(x.shape))
               for p, x in flatten(variable_shapes(config)).items())


def architecture_differences(stored, config) -> list[tuple[str, Any, Any]]:
  """(key, the weights' value, the config's) of the model fields that differ
  (training, data and evaluation settings left out)."""
  if stored is None:
    return []
  return integrity.config_differences(
      integrity.config_to_dict(stored), integrity.config_to_dict(config),
      may_change=_NOT_ARCHITECTURE)


def _first(items, fmt=str) -> str:
  shown = ', '.join(fmt(x) for x in items[:SHOWN])
  more = f' and {len(items) - SHOWN} more' if len(items) > SHOWN else ''
  return shown + more


def describe(problems: dict, differences) -> str:
  """One line: the counts, the first few of each kind, the differing
  config fields."""
  parts = []
  if problems['missing']:
    parts.append(f"{len(problems['missing'])} missing "
                 f"({_first(problems['missing'])})")
  if problems['unexpected']:
    parts.append(f"{len(problems['unexpected'])} unexpected "
                 f"({_first(problems['unexpected'])})")
  if problems['misshaped']:
    parts.append(f"{len(problems['misshaped'])} mis-shaped (" + _first(
        problems['misshaped'],
        lambda m: f'{m[0]} {m[1]} in the weights, {m[2]} in the model')
        + ')')
  text = '; '.join(parts)
  if differences:
    text += ('; config fields that differ from the weights\' own config: '
             + _first(differences, lambda d: f'{d[0]}={d[2]!r} (weights: '
                      f'{d[1]!r})'))
  return text


def check_fit(variables: dict, config, *, source: str = 'weights',
              stored_config=None, allow_partial: bool = False,
              opt_in: str = '') -> dict:
  """``variables`` if they fit the model of ``config`` exactly (raises
  ``WeightsMismatchError`` otherwise).  ``allow_partial``: the unexpected
  and mis-shaped tensors are dropped (logged) and the missing ones left to
  the caller's initialisation; the fitting subset is returned.  ``opt_in``:
  how the caller's user allows that (named in the error)."""
  bad = nonfinite_paths(variables)
  if bad:
    raise WeightsMismatchError(
        f'{source}: {len(bad)} weight tensors hold NaN or infinite values '
        f'({_first(bad)}); refusing to load them')
  problems = fit_problems(variables, expected_shapes(config))
  if not any(problems.values()):
    return variables
  text = describe(problems, architecture_differences(stored_config, config))
  if not allow_partial:
    raise WeightsMismatchError(
        f'{source}: the weights do not fit the model of this config: {text}. '
        'Use the config stored with the weights (drop the --config / '
        '--config.KEY overrides that change the model)' + (
            f', or {opt_in}' if opt_in else ''))
  drop = set(problems['unexpected']) | {m[0] for m in problems['misshaped']}
  log.warning('%s: partial load (train.init_from_partial): %s', source, text)
  return nest({split(p): x for p, x in flatten(variables).items()
               if p not in drop})
