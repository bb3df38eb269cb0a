"""Loading weights for any entry point: a converted directory or a .pth.

    variables, config = load_weights('weights/ddq_r50')          # converted
    variables, config = load_weights('ddq_r50.pth')              # converted now
    variables, config = load_weights('x.pth', config=my_config)  # explicit arch
"""
from __future__ import annotations

import os

import ml_collections

from ddq_jax.conversion import weights_io


def load_weights(path: str, config: ml_collections.ConfigDict | None = None
                 ) -> tuple[dict, ml_collections.ConfigDict]:
  """(variables, config).  The config stored with the weights wins unless
  one is given.  Errors name the path and what was expected."""
  if os.path.isdir(path):
    variables, stored = weights_io.load_converted(path)
    config = config or stored
    if config is None:
      raise ValueError(f'{path}: no config.json beside the weights; pass '
                       '--config')
    return variables, config
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or directory; expected a '
                            'directory written by convert_weights.py or an '
                            'mmdetection .pth')
  from ddq_jax.conversion.converter import convert_checkpoint
  variables, config, _ = convert_checkpoint(path, config)
  return variables, config
