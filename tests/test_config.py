"""The config schema: every config (a file's, one stored with weights) is
merged onto the defaults; every field can be set from the command line; the
learning-rate groups and frozen parameters are one (regex, lr_mult) list;
one Precision object."""
import json

import jax.numpy as jnp
import pytest

from ddq_jax import cli
from ddq_jax.config import (ConfigError, complete_config, config_keys,
                            default_config, load_config)
from ddq_jax.io.conversion import weights_io
from ddq_jax.model import param_groups as pg
from ddq_jax.precision import Precision


def _drop(data: dict, dotted: str) -> None:
  *parents, leaf = dotted.split('.')
  for p in parents:
    data = data[p]
  del data[leaf]


def test_stored_config_missing_fields_takes_the_defaults(tmp_path):
  stored = json.loads(load_config('tiny').to_json_best_effort())
  for key in ('eval.max_images', 'train.steps_per_epoch', 'class_names',
              'backbone.bn_trainable', 'padding_invariant',
              'train.remat.decoder'):
    _drop(stored, key)
  stored['train']['max_steps'] = 7
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  c = weights_io.load_config_json(str(tmp_path / 'config.json'))
  assert c.eval.max_images == 0 and c.train.steps_per_epoch == 0
  assert c.class_names == () and c.backbone.bn_trainable is False
  assert c.padding_invariant is True and c.train.remat.decoder == 'full'
  assert c.train.max_steps == 7 and c.embed_dims == 64
  assert c.data.canvas_sizes == ((128, 128), (128, 160), (160, 128))
  assert sorted(config_keys(c)) == sorted(config_keys(default_config()))


def test_stored_swin_config_takes_the_swin_defaults():
  c = complete_config({'backbone': {'type': 'swin', 'embed_dims': 32}})
  assert c.backbone.embed_dims == 32 and c.backbone.window_size == 12
  assert 'depth' not in c.backbone and c.padding_invariant is True


@pytest.mark.parametrize('data, message', [
    ({'eval': {'max_imgs': 1}}, "a/config.json: config has no field "
     "'eval.max_imgs'; did you mean 'eval.max_images'"),
    ({'optim': 3}, "'optim' is a section"),
    ({'train': {'max_steps': 'x'}}, "'train.max_steps' is a int"),
    ({'backbone': {'type': 'vit'}}, "expected one of"),
])
def test_stored_config_errors_name_the_field(data, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
    complete_config(data, source='a/config.json')


def test_every_field_parses_from_the_command_line():
  rest, ov = cli.split_overrides(['--config.eval.max_images=5',
                                  '--config.train.steps_per_epoch=7'])
  assert rest == []
  c = load_config('tiny', ov)
  assert c.eval.max_images == 5 and c.train.steps_per_epoch == 7


def test_published_configs_are_complete():
  for name in ('ddq_r50_4scale', 'ddq_swinl_4scale', 'tiny_synthetic'):
    c = load_config(name)
    assert sorted(config_keys(c)) == sorted(config_keys(
        default_config(c.backbone.type)))
  assert default_config('swin').backbone.to_dict() == \
      load_config('ddq_swinl_4scale').backbone.to_dict()


def test_r50_lr_groups_and_frozen_parameters():
  c = load_config('ddq_r50_4scale')
  rules = pg.param_rules(c)
  assert rules == (
      (r'^backbone/(conv1|bn1)/', None),
      (r'^backbone/layer(1)_(\d+|tail)/', None),
      (r'^backbone/(.+/)?(bn\d+|downsample_1|norm\d*)/', None),
      (pg.BACKBONE_PATTERN, 0.1), ('', 1.0))
  assert pg.lr_mults(rules) == {pg.DEFAULT: 1.0, pg.BACKBONE: 0.1}
  assert pg.frozen_stage_count(c) == 1
  assert pg.label('backbone/layer2_0/conv1/kernel', rules) == pg.BACKBONE
  assert pg.label('backbone/layer2_0/bn1/scale', rules) == pg.FROZEN
  assert pg.label('neck/convs_0/gn/scale', rules) == pg.DEFAULT
  c.optim.frozen_params = ('^backbone/layer2_',)
  assert pg.frozen_stage_count(c) == 2
  c.backbone.frozen_stages = -1
  assert pg.frozen_stage_count(c) == -1


def test_swin_lr_groups_and_frozen_parameters():
  c = load_config('ddq_swinl_4scale')
  assert pg.param_rules(c) == ((pg.BACKBONE_PATTERN, 0.05), ('', 1.0))
  assert pg.frozen_stage_count(c) == -1
  c.backbone.frozen_stages = 2
  rules = pg.param_rules(c)
  assert rules[:2] == (
      (r'^backbone/(patch_embed|absolute_pos_embed)(/|$)', None),
      (r'^backbone/(stages_|norm)(0|1)/', None))
  assert pg.frozen_stage_count(c) == 2
  assert pg.lr_mult('backbone/norm1/scale', rules) is None
  assert pg.lr_mult('backbone/stages_2/blocks_0/norm1/scale', rules) == 0.05
  c.backbone.frozen_stages = 0
  assert pg.frozen_stage_count(c) == 0


def test_precision_from_the_config():
  c = load_config('tiny', {'train.compute_dtype': 'bfloat16'})
  p = Precision.from_config(c)
  assert p.mixed and p.module_dtype == jnp.bfloat16
  tree = p.cast({'w': jnp.ones(2), 'i': jnp.ones(2, jnp.int32)})
  assert tree['w'].dtype == jnp.bfloat16 and tree['i'].dtype == jnp.int32
  assert Precision.from_config(load_config('tiny')).module_dtype is None
  with pytest.raises(ValueError, match='float16'):
    Precision('float16')
