"""Loading weights for any entry point: a converted directory or a .pth.

    variables, config = load_weights('weights/ddq_r50')          # converted
    variables, config = load_weights('ddq_r50.pth')              # converted now
    variables, config = load_weights('x.pth', config=my_config)  # explicit arch
    variables, config = load_weights('runs/r50')                 # train.py workdir
    variables, config = load_weights('runs/r50/checkpoints/4000')  # one step
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
    trained = load_train_checkpoint(path, config)
    if trained is not None:
      return trained
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


def load_train_checkpoint(path: str,
                          config: ml_collections.ConfigDict | None = None):
  """(variables, config) of a model trained by ``train.py``, or None when
  ``path`` is no training checkpoint.

  ``path``: a workdir (``config.json`` + ``checkpoints/<step>/``: its latest
  step), its ``checkpoints/`` directory (latest step), or one step directory
  ``checkpoints/<step>/`` (holding ``state/`` and ``meta/``).  Only the
  parameters and BatchNorm statistics are read (no optimiser state).  The
  config is the given one, else the workdir's ``config.json``.
  """
  path = os.path.abspath(path)
  is_step = lambda d: (os.path.basename(d).isdigit()
                       and os.path.isdir(os.path.join(d, 'state')))
  if is_step(path):
    ckpt_dir, step = os.path.dirname(path), int(os.path.basename(path))
  else:
    ckpt_dir = (os.path.join(path, 'checkpoints')
                if os.path.isdir(os.path.join(path, 'checkpoints')) else path)
    steps = sorted(int(d) for d in os.listdir(ckpt_dir)
                   if is_step(os.path.join(ckpt_dir, d)))
    if not steps:
      if ckpt_dir != path:
        raise FileNotFoundError(f'{path}: a train.py workdir without any '
                                'complete checkpoint under checkpoints/')
      return None
    step = steps[-1]
  if config is None:
    workdir = os.path.dirname(ckpt_dir)
    cfg_path = os.path.join(workdir, weights_io.CONFIG_FILE)
    if not os.path.isfile(cfg_path):
      raise ValueError(f'{path}: training checkpoint step {step} but no '
                       f'config.json in {workdir}; pass --config')
    config = weights_io.load_config_json(cfg_path)
  from ddq_jax.training.checkpoint import load_params_only  # pylint: disable=g-import-not-at-top
  return load_params_only(ckpt_dir, step), config
