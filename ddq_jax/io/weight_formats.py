"""Weight formats: one table of (name, detector predicate, loader).

    fmt, source = identify(path)          # the first format that accepts path
    variables, stored = fmt.load(source, config)

``FORMATS``, in the order they are tried:

  converted         a directory written by ``convert_weights.py``
                    (variables.msgpack + config.json): the whole detector;
  train_checkpoint  a ``train.py`` run: its workdir, its ``checkpoints/``
                    or one ``checkpoints/<step>/`` (parameters and BatchNorm
                    statistics; the newest intact step): the whole detector;
  torchvision       a bare torchvision ResNet ``.pth``: the backbone only;
  official_swin     an official Swin classification ``.pth``: the backbone
                    only;
  mmdet             an mmdetection DDQ-DETR ``.pth`` (converted on load):
                    the whole detector.

A ``.pth`` is read once (``WeightSource``: the predicates and the loader
share the read).  A path no predicate accepts is an ``UnknownWeightFormat``
naming the path and every known format; a path that does not exist, a
``FileNotFoundError`` naming them too.  Every reader of weights
(``io/weights.py``: predict, evaluate, export, benchmark, the ``Detector``,
``train.init_from``; the convert command) goes through ``identify``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Optional

import ml_collections

from ddq_jax.io.conversion import swin as swin_conv
from ddq_jax.io.conversion import torch_pickle
from ddq_jax.io.conversion import weights_io
from ddq_jax.io.conversion.converter import ConversionError, convert_checkpoint
from ddq_jax.io.conversion.mmdet_config import ConfigParseError
from ddq_jax.io.conversion.torchvision import torchvision_resnet_to_variables
from ddq_jax.train.checkpoint import load_params_only

log = logging.getLogger('ddq_jax.io.weights')

_DETECTOR_PREFIXES = ('backbone.', 'encoder.', 'decoder.', 'neck.',
                      'bbox_head.')
Loaded = tuple[dict, Optional[ml_collections.ConfigDict]]


class UnknownWeightFormat(ValueError):
  """A path that no known weight format accepts."""


class WeightSource:
  """A weights path; a file's checkpoint is read at most once."""

  def __init__(self, path: str):
    self.path = path

  @functools.cached_property
  def checkpoint(self) -> Any:
    return torch_pickle.load_torch_checkpoint(self.path)

  @functools.cached_property
  def state_dict(self) -> dict:
    return torch_pickle.state_dict_of(self.checkpoint, self.path)

  @functools.cached_property
  def names(self) -> list[str]:
    """The state dict's tensor names without a ``module.`` prefix."""
    return [k[len('module.'):] if k.startswith('module.') else k
            for k in self.state_dict]


@dataclasses.dataclass(frozen=True)
class WeightFormat:
  name: str
  summary: str          # what it is, as errors list it
  whole_detector: bool  # False: the backbone only (train.init_from)
  accepts: Callable[[WeightSource], bool]
  load: Callable[[WeightSource, Optional[ml_collections.ConfigDict]], Loaded]


# ---------------------------------------------------------------- predicates
def is_torchvision_resnet(names) -> bool:
  """A bare torchvision ResNet's tensor names (no detector parts)?"""
  return 'layer1.0.conv1.weight' in names and not any(
      n.startswith(_DETECTOR_PREFIXES) for n in names)


def is_official_swin(names) -> bool:
  """Tensor names in the official Swin repository's layout?"""
  return 'patch_embed.proj.weight' in names and any(
      n.startswith('layers.0.blocks.0.attn.') for n in names)


def is_mmdet_detector(names) -> bool:
  """Tensor names of an mmdetection detector (backbone., encoder., ...)?"""
  return any(n.startswith(_DETECTOR_PREFIXES) for n in names)


def train_run(path: str) -> Optional[tuple[str, Optional[int]]]:
  """(checkpoints directory, step or None: the newest) of a ``train.py``
  run at ``path`` (a workdir, its ``checkpoints/`` or one step), or None."""
  path = os.path.abspath(path)
  if _is_step(path):
    return os.path.dirname(path), int(os.path.basename(path))
  sub = os.path.join(path, 'checkpoints')
  if os.path.isdir(sub):
    return sub, None
  if any(_is_step(os.path.join(path, d)) for d in os.listdir(path)):
    return path, None
  return None


def _is_step(d: str) -> bool:
  return os.path.basename(d).isdigit() and os.path.isdir(
      os.path.join(d, 'state'))


def _is_file(src: WeightSource) -> bool:
  return os.path.isfile(src.path)


# ---------------------------------------------------------------- loaders
def _load_converted(src: WeightSource, config) -> Loaded:
  del config  # the directory's own config.json
  return weights_io.load_converted(src.path)


def workdir_config(path: str) -> Optional[ml_collections.ConfigDict]:
  """The config.json of the train.py workdir ``path`` is in (a workdir,
  its checkpoints/ or one step), or None."""
  path = os.path.abspath(path)
  for d in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(
      path))):
    cfg = os.path.join(d, weights_io.CONFIG_FILE)
    if os.path.isdir(os.path.join(d, 'checkpoints')) and os.path.isfile(cfg):
      return weights_io.load_config_json(cfg)
  return None


def _load_train_checkpoint(src: WeightSource, config) -> Loaded:
  """The parameters and BatchNorm statistics (no optimiser state) of the
  newest intact step (or the step named), and the workdir's config.json."""
  ckpt_dir, step = train_run(src.path)
  if step is None and not any(_is_step(os.path.join(ckpt_dir, d))
                              for d in os.listdir(ckpt_dir)):
    raise FileNotFoundError(f'{src.path}: a train.py workdir without any '
                            'complete checkpoint under checkpoints/')
  stored = workdir_config(src.path)
  if stored is None and config is None:
    raise ValueError(f'{src.path}: a training checkpoint but no config.json '
                     f'in {os.path.dirname(ckpt_dir)}; pass --config')
  return load_params_only(ckpt_dir, step), stored


def _load_mmdet(src: WeightSource, config) -> Loaded:
  """Converted now: with the architecture the checkpoint carries
  (``meta['cfg']``), else with ``config`` (then no stored config)."""
  try:
    variables, stored, _ = convert_checkpoint(src.path, None,
                                              checkpoint=src.checkpoint)
    return variables, stored
  except (ConfigParseError, ConversionError):
    if config is None:
      raise
  variables, _, _ = convert_checkpoint(src.path, config,
                                       checkpoint=src.checkpoint)
  return variables, None


def _backbone_config(src: WeightSource, config):
  if config is None:
    raise ValueError(f'{src.path}: backbone-only weights need the config of '
                     'the model they start')
  return config


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


def _load_torchvision(src: WeightSource, config) -> Loaded:
  config = _backbone_config(src, config)
  return torchvision_backbone_variables(src.state_dict, config), None


def _load_official_swin(src: WeightSource, config) -> Loaded:
  config = _backbone_config(src, config)
  variables, rep = swin_conv.official_backbone_variables(src.state_dict,
                                                         config)
  log.info('%s: official Swin (backbone only): %d tensors, unused %s, kept '
           'at init %s', src.path, rep['loaded'], rep['unused'],
           rep['not_in_checkpoint'])
  return variables, None


# ---------------------------------------------------------------- the table
FORMATS: tuple[WeightFormat, ...] = (
    WeightFormat(
        'converted', 'a directory written by convert_weights.py '
        f'({weights_io.VARIABLES_FILE} + {weights_io.CONFIG_FILE})', True,
        lambda s: os.path.isfile(os.path.join(s.path,
                                              weights_io.VARIABLES_FILE)),
        _load_converted),
    WeightFormat(
        'train_checkpoint', 'a train.py run (its workdir, checkpoints/ or '
        'one checkpoints/<step>/)', True,
        lambda s: os.path.isdir(s.path) and train_run(s.path) is not None,
        _load_train_checkpoint),
    WeightFormat(
        'torchvision', 'a torchvision ResNet .pth (backbone only)', False,
        lambda s: _is_file(s) and is_torchvision_resnet(s.names),
        _load_torchvision),
    WeightFormat(
        'official_swin', 'an official Swin classification .pth (backbone '
        'only)', False,
        lambda s: _is_file(s) and is_official_swin(s.names),
        _load_official_swin),
    WeightFormat(
        'mmdet', 'an mmdetection DDQ-DETR .pth (converted on load)', True,
        lambda s: _is_file(s) and is_mmdet_detector(s.names),
        _load_mmdet),
)
BY_NAME = {f.name: f for f in FORMATS}


def known_formats(formats=FORMATS) -> str:
  return '; '.join(f'{f.name}: {f.summary}' for f in formats)


def identify(path: str) -> tuple[WeightFormat, WeightSource]:
  """The first format of ``FORMATS`` that accepts ``path``, and its source.

  Raises:
    FileNotFoundError: no such path.
    UnknownWeightFormat: no format accepts it (both name the path and the
      known formats).
    torch_pickle.CheckpointReadError: a file that is no PyTorch checkpoint.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or directory; expected '
                            f'one of the weight formats ({known_formats()})')
  src = WeightSource(path)
  for fmt in FORMATS:
    if fmt.accepts(src):
      return fmt, src
  raise UnknownWeightFormat(f'{path}: not a known weight format; expected '
                            f'one of ({known_formats()})')


def weight_format(path: str) -> str:
  """The name of ``path``'s format (``identify``)."""
  return identify(path)[0].name
