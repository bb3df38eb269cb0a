"""Weights for any entry point.

    variables, config = load_weights('weights/ddq_r50')          # converted
    variables, config = load_weights('ddq_r50.pth')              # converted now
    variables, config = load_weights('x.pth', config=my_config)  # explicit arch
    variables, config = load_weights('runs/r50')                 # train.py workdir
    variables, config = load_weights('runs/r50/checkpoints/4000')  # one step
    variables = load_pretrained('resnet50.pth', config)          # train init

The formats and how each is told apart and read are one table,
``io/weight_formats.py`` (``FORMATS``); this module checks what they give
against the model (``weights_fit.check_fit``).
"""
from __future__ import annotations

import logging

import ml_collections

from ddq_jax.config import apply_overrides
from ddq_jax.io import weight_formats
from ddq_jax.io.weights_fit import check_fit

log = logging.getLogger('ddq_jax.io.weights')


def _whole_detector(path: str):
  """(format, source) of whole-detector weights at ``path``."""
  fmt, src = weight_formats.identify(path)
  if not fmt.whole_detector:
    whole = [f for f in weight_formats.FORMATS if f.whole_detector]
    raise ValueError(
        f'{path}: {fmt.summary}; expected the whole detector\'s weights '
        f'({weight_formats.known_formats(whole)}).  Backbone weights start '
        'a training run: --config.train.init_from')
  return fmt, src


def read_weights(path: str, config: ml_collections.ConfigDict | None = None
                 ) -> tuple[dict, ml_collections.ConfigDict | None]:
  """(variables, the weights' own config or None) of a whole detector
  ('converted', a training checkpoint, or 'mmdet'), unchecked.  ``config``
  is needed only where the weights carry none."""
  fmt, src = _whole_detector(path)
  return fmt.load(src, config)


def load_weights(path: str, config: ml_collections.ConfigDict | None = None,
                 *, overrides: dict | None = None,
                 allow_partial: bool = False, opt_in: str = ''
                 ) -> tuple[dict, ml_collections.ConfigDict]:
  """(variables, config) of a whole detector ('converted', a training
  checkpoint, or 'mmdet'), checked against the model of that config.

  The config stored with the weights wins unless one is given; then
  ``overrides`` ({'key.sub': value}) apply to the stored one.  Errors name
  the path and what was expected; weights that do not fit the model (or are
  not finite) are a ``weights_fit.WeightsMismatchError`` (one line), unless
  ``allow_partial`` (see ``weights_fit.check_fit``)."""
  variables, stored = read_weights(path, config)
  if config is None:
    if stored is None:
      raise ValueError(f'{path}: no config.json beside the weights; pass '
                       '--config')
    config = stored.copy_and_resolve_references()
    if overrides:
      apply_overrides(config, overrides)
  variables = check_fit(variables, config, source=path, stored_config=stored,
                        allow_partial=allow_partial, opt_in=opt_in)
  return variables, config


def load_pretrained(path: str, config) -> dict:
  """{'params': {...}, 'batch_stats': {...}} (numpy, full paths) to start
  training from, in any format of ``weight_formats.FORMATS``: backbone
  weights as they are, a whole detector checked against the model of
  ``config`` (``train.init_from_partial``: the fitting tensors only)."""
  fmt, src = weight_formats.identify(path)
  log.info('init_from: %s %s', fmt.summary, path)
  if not fmt.whole_detector:
    return fmt.load(src, config)[0]
  variables, stored = fmt.load(src, config)
  return check_fit(
      variables, config, source=path, stored_config=stored,
      allow_partial=bool(config.train.init_from_partial),
      opt_in='allow a partial load (the fitting tensors) with '
      '--config.train.init_from_partial=True')
