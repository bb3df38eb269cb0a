"""Weights for any entry point: the one place that tells weight formats apart.

    variables, config = load_weights('weights/ddq_r50')          # converted
    variables, config = load_weights('ddq_r50.pth')              # converted now
    variables, config = load_weights('x.pth', config=my_config)  # explicit arch
    variables, config = load_weights('runs/exp1')                # train.py run
    variables = load_pretrained('resnet50.pth', config)          # train init

Formats (``weight_format``):
  'converted'        a directory written by ``convert_weights.py``
                     (variables.msgpack + config.json);
  'train_checkpoint' a training run's directory (``<workdir>`` or
                     ``<workdir>/checkpoints`` with numbered steps);
  'mmdet'            an mmdetection DDQ-DETR ``.pth`` (converted on load);
  'torchvision'      a bare torchvision ResNet ``.pth`` (backbone only).
"""
from __future__ import annotations

import logging
import os

import ml_collections

from ddq_jax.conversion import weights_io

log = logging.getLogger('ddq_jax.weights')

_DETECTOR_PREFIXES = ('backbone.', 'encoder.', 'decoder.', 'neck.',
                      'bbox_head.')


def _checkpoint_dir(path: str) -> str | None:
  for d in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d)):
      return d
  return None


def is_torchvision_resnet(state_dict: dict) -> bool:
  """A bare torchvision ResNet state dict (no detector parts)?"""
  names = [k[len('module.'):] if k.startswith('module.') else k
           for k in state_dict]
  return 'layer1.0.conv1.weight' in names and not any(
      n.startswith(_DETECTOR_PREFIXES) for n in names)


def weight_format(path: str, state_dict: dict | None = None) -> str:
  """'converted' | 'train_checkpoint' | 'mmdet' | 'torchvision' for a path
  (``state_dict``: the .pth's tensors when already read)."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, weights_io.VARIABLES_FILE)):
      return 'converted'
    if _checkpoint_dir(path):
      return 'train_checkpoint'
    raise FileNotFoundError(
        f'{path}: neither a converted weights directory (no '
        f'{weights_io.VARIABLES_FILE}) nor a training run (no numbered '
        'checkpoints)')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or directory; expected a '
                            'directory written by convert_weights.py or an '
                            'mmdetection .pth')
  if state_dict is None:
    from ddq_jax.conversion.torch_pickle import load_torch_checkpoint, state_dict_of  # pylint: disable=g-import-not-at-top
    state_dict = state_dict_of(load_torch_checkpoint(path), path)
  return 'torchvision' if is_torchvision_resnet(state_dict) else 'mmdet'


def load_weights(path: str, config: ml_collections.ConfigDict | None = None
                 ) -> tuple[dict, ml_collections.ConfigDict]:
  """(variables, config) of a whole detector ('converted', 'mmdet' or
  'train_checkpoint': the latest step).
  The config stored with the weights wins unless one is given.  Errors
  name the path and what was expected."""
  if os.path.isdir(path):
    fmt = weight_format(path)
    if fmt == 'train_checkpoint':
      return load_train_workdir(path, config)
    if fmt != 'converted':
      raise ValueError(f'{path}: a {fmt} directory; expected converted '
                       'weights (convert_weights.py)')
    variables, stored = weights_io.load_converted(path)
    config = config or stored
    if config is None:
      raise ValueError(f'{path}: no config.json beside the weights; pass '
                       '--config')
    return variables, config
  weight_format(path, state_dict={})  # existence check, no read
  from ddq_jax.conversion.converter import convert_checkpoint  # pylint: disable=g-import-not-at-top
  variables, config, _ = convert_checkpoint(path, config)
  return variables, config


def load_train_workdir(path: str, config=None
                       ) -> tuple[dict, ml_collections.ConfigDict]:
  """(variables, config) of a ``train.py`` run: the latest step of
  ``<workdir>/checkpoints`` (or of ``path`` itself when it holds the steps)
  and the run's ``config.json`` unless ``config`` is given."""
  from ddq_jax.training.checkpoint import load_params_only  # pylint: disable=g-import-not-at-top
  d = _checkpoint_dir(path)
  if d is None:
    raise FileNotFoundError(f'{path}: no numbered checkpoints (expected a '
                            'train.py workdir)')
  if config is None:
    for c in (os.path.join(path, weights_io.CONFIG_FILE),
              os.path.join(os.path.dirname(os.path.abspath(d)),
                           weights_io.CONFIG_FILE)):
      if os.path.isfile(c):
        config = weights_io.load_config_json(c)
        break
    else:
      raise ValueError(f'{path}: no config.json in the training run; pass '
                       '--config')
  return load_params_only(d), config


def torchvision_backbone_variables(state_dict: dict, config) -> dict:
  """torchvision ResNet tensors -> {'params': {'backbone': ...},
  'batch_stats': {'backbone': ...}} (the classifier ``fc`` is dropped)."""
  from ddq_jax.conversion.torchvision import torchvision_resnet_to_variables  # pylint: disable=g-import-not-at-top
  sd = {k: v for k, v in state_dict.items()
        if not k.startswith(('fc.', 'module.fc.'))}
  bb = torchvision_resnet_to_variables(
      sd, depth=int(config.backbone.depth),
      base_channels=int(config.backbone.base_channels))
  return {'params': {'backbone': bb['params']},
          'batch_stats': {'backbone': bb['batch_stats']}}


def load_pretrained(path: str, config) -> dict:
  """{'params': {...}, 'batch_stats': {...}} (numpy, full paths) to start
  training from, in any of the four formats."""
  if os.path.isdir(path) and weight_format(path) == 'train_checkpoint':
    from ddq_jax.training.checkpoint import load_params_only  # pylint: disable=g-import-not-at-top
    d = _checkpoint_dir(path)
    log.info('init_from: TrainState checkpoint %s', d)
    return load_params_only(d)
  if os.path.isfile(path):
    from ddq_jax.conversion.torch_pickle import load_torch_checkpoint, state_dict_of  # pylint: disable=g-import-not-at-top
    sd = state_dict_of(load_torch_checkpoint(path), path)
    if weight_format(path, sd) == 'torchvision':
      log.info('init_from: torchvision ResNet %s (backbone only)', path)
      return torchvision_backbone_variables(sd, config)
  log.info('init_from: converted weights %s', path)
  variables, _ = load_weights(path, config)
  return variables
