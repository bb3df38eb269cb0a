"""mmdetection DDQ-DETR checkpoint -> our variables, with a full report.

    variables, config, report = convert_checkpoint('ddq_r50.pth')

The architecture comes from the config text the checkpoint carries in
``meta['cfg']`` (parsed safely), or from a config given by the caller.
Every tensor goes through the declarative table in ``mapping.py``; the
result is checked against the shapes our model expects for that config.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddq_jax.io.conversion import mapping
from ddq_jax.io.conversion.mmdet_config import (config_from_mmdet,
                                                ConfigParseError)
from ddq_jax.io.conversion.torch_pickle import CheckpointReadError, load_torch_checkpoint, state_dict_of
from ddq_jax.model.variables import variable_shapes
from ddq_jax.tree_paths import flat_items, path_str


class ConversionError(ValueError):
  """The checkpoint does not fit the model; the message lists every problem."""


@dataclasses.dataclass
class ConversionReport:
  converted: int = 0
  ignored: dict = dataclasses.field(default_factory=dict)    # name -> reason
  unmapped: list = dataclasses.field(default_factory=list)   # no table row
  missing: list = dataclasses.field(default_factory=list)    # model wants it
  unexpected: list = dataclasses.field(default_factory=list)  # model lacks it
  misshaped: list = dataclasses.field(default_factory=list)  # (name, got, want)

  @property
  def ok(self) -> bool:
    return not (self.unmapped or self.missing or self.unexpected or
                self.misshaped)

  def describe(self, limit: int = 30) -> str:
    lines = []
    for title, items in (('unmapped (no table row)', self.unmapped),
                         ('missing (the model needs them)', self.missing),
                         ('unexpected (the model has no such weight)',
                          self.unexpected),
                         ('mis-shaped (checkpoint vs model)', self.misshaped)):
      if items:
        lines.append(f'{len(items)} {title}:')
        lines += [f'  {item}' for item in items[:limit]]
        if len(items) > limit:
          lines.append(f'  ... and {len(items) - limit} more')
    return '\n'.join(lines)


def expected_shapes(config: ml_collections.ConfigDict) -> dict[tuple, tuple]:
  """{path: shape} of every variable the model builds for ``config``."""
  shapes = variable_shapes(config)
  return {path: tuple(leaf.shape) for path, leaf in flat_items(shapes)}


def check_variables(variables: dict, want: dict[tuple, tuple],
                    torch_names: dict[tuple, str],
                    report: ConversionReport) -> None:
  have = {path: tuple(np.shape(leaf)) for path, leaf in flat_items(variables)}
  def name(path):
    return f"{torch_names.get(path, '?')} -> {path_str(path)}"
  report.missing = sorted(path_str(p) for p in want if p not in have)
  report.unexpected = sorted(name(p) for p in have if p not in want)
  report.misshaped = sorted(
      f'{name(p)}: {have[p]} vs {want[p]}' for p in have
      if p in want and have[p] != want[p])


def convert_state_dict_checked(
    state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict,
    *, check: bool = True) -> tuple[dict, ConversionReport]:
  variables, ignored, unmapped = mapping.convert_state_dict(state_dict)
  # Both collections always present (a Swin backbone has no BatchNorm).
  variables.setdefault('batch_stats', {})
  # Counted in torch tensors (the layers of a stacked group one each).
  report = ConversionReport(converted=len(state_dict) - len(ignored)
                            - len(unmapped),
                            ignored=ignored, unmapped=sorted(unmapped))
  if check:
    check_variables(variables, expected_shapes(config),
                    mapping.torch_names_by_path(state_dict), report)
  return variables, report


def convert_checkpoint(
    path: str, config: ml_collections.ConfigDict | None = None,
    *, check: bool = True, checkpoint: Any = None,
) -> tuple[dict, ml_collections.ConfigDict, ConversionReport]:
  """Reads an mmdetection DDQ-DETR ``.pth`` and maps it onto our model.

  ``checkpoint``: the file's object when already read
  (``load_torch_checkpoint``), so it is not read twice.

  Raises:
    CheckpointReadError: unreadable / truncated / not a torch checkpoint.
    ConfigParseError: no usable architecture (no ``meta['cfg']`` and no
      ``config`` given, or an unsupported architecture).
    ConversionError: tensors missing, unexpected or mis-shaped; the message
      lists them by name.
  """
  obj = load_torch_checkpoint(path) if checkpoint is None else checkpoint
  state_dict = state_dict_of(obj, path)
  if config is None:
    meta = obj.get('meta', {}) if isinstance(obj, dict) else {}
    cfg_text = meta.get('cfg') if isinstance(meta, dict) else None
    if not isinstance(cfg_text, str):
      raise ConfigParseError(
          f"{path}: the checkpoint carries no config text in meta['cfg']; "
          'pass the architecture with --config (e.g. configs/ddq_r50_4scale.py)')
    config = config_from_mmdet(cfg_text)
  variables, report = convert_state_dict_checked(state_dict, config,
                                                 check=check)
  if not report.ok:
    raise ConversionError(
        f'{path} does not fit the model of config {config.name!r}:\n'
        + report.describe())
  return variables, config, report


__all__ = ['CheckpointReadError', 'ConversionError', 'ConversionReport',
           'convert_checkpoint', 'convert_state_dict_checked',
           'expected_shapes']
