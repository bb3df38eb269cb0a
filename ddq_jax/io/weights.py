"""Weights for any entry point: the one place that tells weight formats apart.

    variables, config = load_weights('weights/ddq_r50')          # converted
    variables, config = load_weights('ddq_r50.pth')              # converted now
    variables, config = load_weights('x.pth', config=my_config)  # explicit arch
    variables, config = load_weights('runs/r50')                 # train.py workdir
    variables, config = load_weights('runs/r50/checkpoints/4000')  # one step
    variables = load_pretrained('resnet50.pth', config)          # train init

Formats (``weight_format``):
  'converted'        a directory written by ``convert_weights.py``
                     (variables.msgpack + config.json);
  'train_checkpoint' a training run's directory (``<workdir>``,
                     ``<workdir>/checkpoints`` with numbered steps, or one
                     ``checkpoints/<step>``);
  'mmdet'            an mmdetection DDQ-DETR ``.pth`` (converted on load);
  'torchvision'      a bare torchvision ResNet ``.pth`` (backbone only).
"""
from __future__ import annotations

import logging
import os

import ml_collections

from ddq_jax.config import apply_overrides
from ddq_jax.io.conversion import swin as swin_conv
from ddq_jax.io.conversion import torch_pickle
from ddq_jax.io.conversion import weights_io
from ddq_jax.io.conversion.converter import ConversionError, convert_checkpoint
from ddq_jax.io.conversion.mmdet_config import ConfigParseError
from ddq_jax.io.conversion.torchvision import torchvision_resnet_to_variables
from ddq_jax.io.weights_fit import check_fit
from ddq_jax.train.checkpoint import load_params_only

log = logging.getLogger('ddq_jax.io.weights')

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
    state_dict = torch_pickle.state_dict_of(
        torch_pickle.load_torch_checkpoint(path), path)
  return 'torchvision' if is_torchvision_resnet(state_dict) else 'mmdet'


def read_weights(path: str, config: ml_collections.ConfigDict | None = None
                 ) -> tuple[dict, ml_collections.ConfigDict | None]:
  """(variables, the weights' own config or None) of a whole detector
  ('converted', a training checkpoint, or 'mmdet'), unchecked.  ``config``
  is needed only where the weights carry none."""
  if os.path.isdir(path):
    trained = load_train_checkpoint(path, config)
    if trained is not None:
      return trained[0], _workdir_config(path) or (
          None if config is not None else trained[1])
    fmt = weight_format(path)
    if fmt != 'converted':
      raise ValueError(f'{path}: a {fmt} directory; expected converted '
                       'weights (convert_weights.py)')
    return weights_io.load_converted(path)
  weight_format(path, state_dict={})  # existence check, no read
  try:  # the architecture the checkpoint carries, whatever ``config`` says
    variables, stored, _ = convert_checkpoint(path, None)
    return variables, stored
  except (ConfigParseError, ConversionError):
    if config is None:
      raise
  variables, _, _ = convert_checkpoint(path, config)
  return variables, None


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


def _workdir_config(path: str) -> ml_collections.ConfigDict | None:
  """The config.json of the train.py workdir ``path`` is in (a workdir,
  its checkpoints/ or one step), or None."""
  path = os.path.abspath(path)
  for d in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(
      path))):
    cfg = os.path.join(d, weights_io.CONFIG_FILE)
    if os.path.isdir(os.path.join(d, 'checkpoints')) and os.path.isfile(cfg):
      return weights_io.load_config_json(cfg)
  return None


def torchvision_backbone_variables(state_dict: dict, config) -> dict:
  """torchvision ResNet tensors -> {'params': {'backbone': ...},
  'batch_stats': {'backbone': ...}} (the classifier ``fc`` is dropped)."""
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
    d = _checkpoint_dir(path)
    log.info('init_from: TrainState checkpoint %s', d)
    return load_params_only(d)
  if os.path.isfile(path):
    sd = torch_pickle.state_dict_of(torch_pickle.load_torch_checkpoint(path),
                                    path)
    if weight_format(path, sd) == 'torchvision':
      log.info('init_from: torchvision ResNet %s (backbone only)', path)
      return torchvision_backbone_variables(sd, config)
    if swin_conv.is_official_swin(sd):
      variables, rep = swin_conv.official_backbone_variables(sd, config)
      log.info('init_from: official Swin %s (backbone only): %d tensors, '
               'unused %s, kept at init %s', path, rep['loaded'],
               rep['unused'], rep['not_in_checkpoint'])
      return variables
  log.info('init_from: detector weights %s', path)
  partial = bool(config.train.init_from_partial)
  variables, _ = load_weights(
      path, config, allow_partial=partial,
      opt_in='allow a partial load (the fitting tensors) with '
      '--config.train.init_from_partial=True')
  return variables


def load_train_checkpoint(path: str,
                          config: ml_collections.ConfigDict | None = None):
  """(variables, config) of a model trained by ``train.py``, or None when
  ``path`` is no training checkpoint.

  ``path``: a workdir (``config.json`` + ``checkpoints/<step>/``: its newest
  intact step), its ``checkpoints/`` directory (likewise), or one step directory
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
    step = None  # the newest intact one (a damaged newest is reported)
  if config is None:
    workdir = os.path.dirname(ckpt_dir)
    cfg_path = os.path.join(workdir, weights_io.CONFIG_FILE)
    if not os.path.isfile(cfg_path):
      raise ValueError(f'{path}: a training checkpoint but no config.json '
                       f'in {workdir}; pass --config')
    config = weights_io.load_config_json(cfg_path)
  return load_params_only(ckpt_dir, step), config
