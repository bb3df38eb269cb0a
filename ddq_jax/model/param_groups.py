"""Learning-rate groups and frozen parameters: one list of
``(regex, lr_mult or None)``.

``param_rules(config)`` derives it once from the backbone type,
``backbone.frozen_stages``, ``backbone.bn_trainable`` (ResNet),
``optim.frozen_params`` and ``optim.backbone_lr_mult``.  Each regex is
``re.search``-ed over a parameter's path below ``params``
(``tree_paths.path_str``: 'backbone/layer1_0/conv1/kernel'); the first
match wins.  ``None``: the
parameter is frozen (the reference's ``requires_grad=False``: no update, no
optimiser state, no gradient); a number: the group's lr multiplier
(mmengine's ``paramwise_cfg.custom_keys``).

Two readers, one list: the optimiser's labels and lr multipliers
(``train/optimizer.py``), and the backbones' ``stop_gradient``
(``frozen_stage_count``: how many leading stages the list freezes).

    rules = param_rules(config)   # R50: ((r'^backbone/(conv1|bn1)/', None),
                                  #   ..., (BACKBONE_PATTERN, 0.1), ('', 1.0))
    label(name, rules)            # 'frozen' | 'backbone' | 'default'
"""
from __future__ import annotations

import re

FROZEN, BACKBONE, DEFAULT = 'frozen', 'backbone', 'default'
# mmengine's custom_keys={'backbone': ...}: a path with a 'backbone' part.
BACKBONE_PATTERN = r'(^|/)backbone(/|$)'
DEFAULT_PATTERN = ''  # every other parameter, lr x 1

# A parameter of each backbone's stem and of the first block of stage i
# (ResNet: 1-based layer{i}; Swin: 0-based stages_{i}): how the backbone
# reads from the list which of its leading stages are frozen.
_STEM = {'resnet': 'backbone/conv1/kernel',
         'swin': 'backbone/patch_embed/projection/kernel'}
_STAGE = {'resnet': 'backbone/layer{}_0/conv1/kernel',
          'swin': 'backbone/stages_{}/blocks_0/attn/w_msa/qkv/kernel'}
_FIRST_STAGE = {'resnet': 1, 'swin': 0}
NUM_STAGES = 4  # ResNet's (Swin's: len(backbone.depths))


def _backbone_frozen(config) -> list[str]:
  """Regexes of the backbone parameters the reference freezes."""
  b = config.backbone
  frozen_stages = int(b.frozen_stages)
  if str(b.type) == 'swin':
    # mmdet SwinTransformer._freeze_stages: the patch embedding, then
    # stages_i and norm_i for i < frozen_stages; its LayerNorms train.
    rules = []
    if frozen_stages >= 0:
      rules.append(r'^backbone/(patch_embed|absolute_pos_embed)(/|$)')
    if frozen_stages >= 1:
      stages = '|'.join(str(i) for i in range(frozen_stages))
      rules.append(rf'^backbone/(stages_|norm)({stages})/')
    return rules
  # mmdet ResNet._freeze_stages: the stem and layer1..layer{k}; and
  # norm_cfg requires_grad=False: every BatchNorm affine.
  rules = []
  if frozen_stages >= 0:
    rules.append(r'^backbone/(conv1|bn1)/')
  if frozen_stages >= 1:
    stages = '|'.join(str(i) for i in range(1, frozen_stages + 1))
    rules.append(rf'^backbone/layer({stages})_(\d+|tail)/')
  if not bool(b.bn_trainable):
    rules.append(r'^backbone/(.+/)?(bn\d+|downsample_1|norm\d*)/')
  return rules


def param_rules(config) -> tuple[tuple[str, float | None], ...]:
  """The ``(regex, lr_mult or None)`` list of ``config``, first match wins.

  Args:
    config: a complete config (sections backbone and optim).
  Returns:
    the backbone's frozen parameters, then ``optim.frozen_params`` (None),
    then the backbone group (``optim.backbone_lr_mult``) and every other
    parameter (1.0).
  """
  frozen = _backbone_frozen(config) + [str(r) for r in
                                       config.optim.frozen_params]
  return tuple([(r, None) for r in frozen] +
               [(BACKBONE_PATTERN, float(config.optim.backbone_lr_mult)),
                (DEFAULT_PATTERN, 1.0)])


def _match(name: str, rules) -> tuple[str, float | None]:
  for pattern, mult in rules:
    if re.search(pattern, name):
      return pattern, mult
  return DEFAULT_PATTERN, 1.0


def lr_mult(name: str, rules) -> float | None:
  """The lr multiplier of the parameter at path ``name`` (None: frozen)."""
  return _match(name, rules)[1]


def label(name: str, rules) -> str:
  """The group of the parameter at ``name``: FROZEN, BACKBONE or DEFAULT."""
  pattern, mult = _match(name, rules)
  if mult is None:
    return FROZEN
  return BACKBONE if pattern == BACKBONE_PATTERN else DEFAULT


def lr_mults(rules) -> dict[str, float]:
  """{group label: lr multiplier} of the trainable groups."""
  mults = {DEFAULT: 1.0}
  for pattern, mult in reversed(rules):  # the first rule of a group wins
    if pattern == BACKBONE_PATTERN and mult is not None:
      mults[BACKBONE] = float(mult)
  return mults


def frozen_stage_count(config, rules=None) -> int:
  """How many leading backbone stages ``rules`` freeze, in the backbone's
  ``frozen_stages`` convention: -1 when the stem (patch embedding) trains,
  else the number of leading stages frozen with it (their outputs pass
  through ``stop_gradient``)."""
  rules = param_rules(config) if rules is None else rules
  kind = str(config.backbone.type)
  if lr_mult(_STEM[kind], rules) is not None:
    return -1
  stages = len(config.backbone.depths) if kind == 'swin' else NUM_STAGES
  count = 0
  while count < stages and lr_mult(
      _STAGE[kind].format(count + _FIRST_STAGE[kind]), rules) is None:
    count += 1
  return count
