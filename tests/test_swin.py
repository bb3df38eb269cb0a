"""Swin backbone: parity with the reference on tiny_swin, drop-path, frozen
stages, out_indices, the official checkpoint layout and the Swin-L manifest."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, load_npz
from ddq_jax.compilation_cache import compile_count
from ddq_jax.config import load_config
from ddq_jax.io import weight_formats
from ddq_jax.io.conversion import swin as swin_conv, torch_pickle
from ddq_jax.model.variables import variable_shapes
from ddq_jax.io.conversion.mapping import convert_state_dict, match_rule, unstack_layers
from ddq_jax.io.conversion.mmdet_config import config_from_mmdet
from ddq_jax.io.conversion.torch_pickle import (load_torch_checkpoint,
    state_dict_of)
from ddq_jax.model import param_groups, swin, swin_windows
from ddq_jax.model.backbones import backbone_out_channels, build_backbone
from ddq_jax.train.loop import load_pretrained
from ddq_jax.train.optimizer import BACKBONE, DEFAULT, FROZEN, param_labels
from ddq_jax.tree_paths import flat_items, leaf_paths, split

DATA = os.path.join(os.path.dirname(__file__), 'data')
TINY_SWIN = os.path.join(DATA, 'tiny_swin')


def _npz(name):
  return load_npz(name, TINY_SWIN)


@pytest.fixture(scope='module')
def swin_state_dict():
  return state_dict_of(load_torch_checkpoint(
      os.path.join(TINY_SWIN, 'checkpoint.pth')))


@pytest.fixture(scope='module')
def swin_params(swin_state_dict):
  variables, _, unmapped = convert_state_dict(swin_state_dict)
  assert not unmapped, unmapped
  return variables['params']['backbone']


@pytest.fixture(scope='module')
def config():
  return load_config('tiny_swin')


def test_backbone_matches_reference(config, swin_params):
  """Images 100x124 and 128x96 on a 128x124 canvas: the stage-1 map is
  32x31 (padded to whole windows and to an even width for merging)."""
  inputs, ref = _npz('inputs.npz'), _npz('infer.npz')
  model = build_backbone(config)
  assert isinstance(model, swin.SwinTransformer)
  fn = jax.jit(lambda p, x: model.apply({'params': p}, x))
  feats = fn(swin_params, inputs['images'])
  feats_again = fn(swin_params, inputs['images'])
  assert compile_count(fn) == 1
  assert len(feats) == 3
  for i, f in enumerate(feats):
    assert_close(np.transpose(np.asarray(f), (0, 3, 1, 2)),
                 ref[f'backbone_feat_{i}'], rel=1e-5,
                 name=f'backbone_feat_{i}')
    np.testing.assert_array_equal(f, feats_again[i])
  assert backbone_out_channels(config) == (64, 128, 256)


def test_relative_position_index_matches_checkpoint(swin_state_dict):
  key = 'backbone.stages.0.blocks.0.attn.w_msa.relative_position_index'
  np.testing.assert_array_equal(swin_windows.relative_position_index(4),
                                swin_state_dict[key])


def test_shifted_window_mask_regions():
  mask = swin_windows.shifted_window_mask(8, 8, window=4, shift=2)
  assert mask.shape == (4, 16, 16)
  assert not mask[0].any()  # the top-left window is one region
  assert set(np.unique(mask)) == {0.0, -100.0}
  # last window: 4 regions of 4 tokens each, each token sees its own 4.
  assert ((mask[3] == 0).sum(-1) == 4).all()


def _tiny_swin(**kw):
  args = dict(embed_dims=16, depths=(2, 2), num_heads=(1, 2), window_size=2,
              strides=(4, 2), out_indices=(0, 1), drop_path_rate=0.0)
  args.update(kw)
  return swin.SwinTransformer(**args)


def test_drop_path_only_in_training():
  x = jax.random.normal(jax.random.key(0), (4, 20, 20, 3))
  model = _tiny_swin(drop_path_rate=0.5)
  params = jax.jit(model.init)(jax.random.key(1), x)['params']
  evaluate = jax.jit(lambda p: model.apply({'params': p}, x))
  train = jax.jit(lambda p, k: model.apply({'params': p}, x,
                                           rngs={'dropout': k}))
  eval_a, eval_b = evaluate(params), evaluate(params)
  train_a = train(params, jax.random.key(2))
  train_b = train(params, jax.random.key(3))
  np.testing.assert_array_equal(eval_a[1], eval_b[1])
  assert not np.allclose(train_a[1], eval_a[1])
  assert not np.allclose(train_a[1], train_b[1])
  # frozen stages run in eval mode: with everything frozen, no drop-path.
  frozen = _tiny_swin(drop_path_rate=0.5, frozen_stages=2)
  np.testing.assert_allclose(
      jax.jit(lambda p: frozen.apply({'params': p}, x, rngs={
          'dropout': jax.random.key(2)}))(params)[1], eval_a[1], atol=1e-6)


def test_drop_path_is_per_sample_and_unbiased():
  x = jnp.ones((20000, 3, 1))
  y = swin.drop_path(x, rate=0.25, rng=jax.random.key(0))
  per_sample = np.asarray(y[:, :, 0])
  assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
  assert set(np.unique(per_sample)) <= {0.0, np.float32(1 / 0.75)}
  assert abs(per_sample.mean() - 1.0) < 0.02
  np.testing.assert_array_equal(swin.drop_path(x, rate=0.25, rng=None), x)


def test_frozen_stages_get_no_gradient(config):
  """The optimiser's frozen parameters (param_groups) get no gradient."""
  x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
  model = _tiny_swin(frozen_stages=1)
  c = config.copy_and_resolve_references()
  c.backbone.frozen_stages = 1
  rules = param_groups.param_rules(c)
  assert param_groups.frozen_stage_count(c) == 1
  params = jax.jit(model.init)(jax.random.key(1), x)['params']
  grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(o ** 2) for o in model.apply(
      {'params': p}, x))))(params)
  for path, g in zip(leaf_paths(grads), jax.tree.leaves(grads)):
    names = split(path)
    frozen = param_groups.lr_mult(f'backbone/{path}', rules) is None
    assert frozen == (names[0] in ('patch_embed', 'stages_0', 'norm0')), names
    if frozen:
      assert not np.asarray(g).any(), names
  assert np.asarray(grads['stages_1']['pairs']['regular']['attn']['w_msa']
                    ['qkv']['kernel']).any()


def test_optimizer_labels_follow_swin_frozen_stages(config):
  model = _tiny_swin()
  params = {'backbone': jax.eval_shape(model.init, jax.random.key(0),
                                       jnp.zeros((1, 16, 16, 3)))['params'],
            'neck': {'w': jnp.zeros(())}}
  c = config.copy_and_resolve_references()
  labels = param_labels(params, c)  # frozen_stages -1: LayerNorms train
  assert labels['backbone']['stages_0']['pairs']['regular']['norm1'][
      'scale'] == BACKBONE
  assert labels['neck']['w'] == DEFAULT
  c.backbone.frozen_stages = 1
  labels = param_labels(params, c)
  assert labels['backbone']['patch_embed']['projection']['kernel'] == FROZEN
  assert labels['backbone']['stages_0']['downsample']['reduction']['kernel'] == FROZEN
  assert labels['backbone']['norm0']['scale'] == FROZEN
  assert labels['backbone']['stages_1']['pairs']['shifted']['norm2'][
      'scale'] == BACKBONE


def test_out_indices_from_config(config):
  c = config.copy_and_resolve_references()
  c.backbone.out_indices = (0, 1, 2, 3)
  model = build_backbone(c)
  feats = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, 70, 45, 3)))[0])
  # 70x45 -> patches 18x12 -> 9x6 -> 5x3 -> 3x2
  assert [f.shape for f in feats] == [(1, 18, 12, 32), (1, 9, 6, 64),
                                      (1, 5, 3, 128), (1, 3, 2, 256)]


def test_config_read_from_checkpoint_text(config):
  text = open(os.path.join(TINY_SWIN, 'mmdet_config.py')).read()
  c = config_from_mmdet(text)
  for key in ('type', 'embed_dims', 'depths', 'num_heads', 'window_size',
              'out_indices', 'drop_path_rate', 'frozen_stages', 'qkv_bias'):
    assert c.backbone[key] == config.backbone[key], key
  assert c.optim.backbone_lr_mult == 0.05 and c.optim.epochs == 30


def _official_merge(x, weight, norm_w, norm_b):
  """The official Swin repository's PatchMerging (x0..x3 concatenation,
  LayerNorm, Linear) on (B, H, W, C), H and W even, torch-layout weight."""
  x = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                      x[:, 1::2, 1::2]], -1)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  x = (x - mu) / np.sqrt(var + 1e-5) * norm_w + norm_b
  return x @ weight.T


def test_official_patch_merging_layout_converts_exactly():
  rng = np.random.default_rng(0)
  c = 6
  w_off = rng.normal(size=(2 * c, 4 * c)).astype(np.float32)
  nw_off = rng.normal(size=(4 * c,)).astype(np.float32)
  nb_off = rng.normal(size=(4 * c,)).astype(np.float32)
  sd = swin_conv.official_to_mmdet({
      'layers.0.downsample.reduction.weight': w_off,
      'layers.0.downsample.norm.weight': nw_off,
      'layers.0.downsample.norm.bias': nb_off})
  params = {'norm': {'scale': sd['backbone.stages.0.downsample.norm.weight'],
                     'bias': sd['backbone.stages.0.downsample.norm.bias']},
            'reduction': {
                'kernel': sd['backbone.stages.0.downsample.reduction.weight'].T}}
  x = rng.normal(size=(2, 4, 6, c)).astype(np.float32)
  ours = swin.PatchMerging(2 * c).apply({'params': params}, x)
  np.testing.assert_allclose(ours, _official_merge(x, w_off, nw_off, nb_off),
                             rtol=1e-5, atol=1e-5)


def test_official_checkpoint_round_trip(config, swin_state_dict, swin_params):
  """The fixture's backbone in the official key layout (plus what an
  official checkpoint also holds) converts back to exactly its tensors."""
  official = swin_conv.mmdet_to_official(swin_state_dict)
  assert 'layers.0.blocks.0.attn.qkv.weight' in official
  assert 'patch_embed.proj.weight' in official
  assert 'layers.2.downsample.reduction.weight' in official
  assert not any(k.startswith(('stages', 'backbone', 'neck')) for k in official)
  official.update({'head.weight': np.zeros((10, 256), np.float32),
                   'head.bias': np.zeros((10,), np.float32),
                   'norm.weight': np.ones((256,), np.float32),
                   'norm.bias': np.zeros((256,), np.float32),
                   'layers.0.blocks.1.attn_mask': np.zeros((64, 16, 16),
                                                           np.float32)})
  assert weight_formats.is_official_swin(official)
  assert not weight_formats.is_official_swin(swin_state_dict)
  back = swin_conv.official_to_mmdet(official)
  for k, v in back.items():
    if k in swin_state_dict:
      np.testing.assert_array_equal(v, swin_state_dict[k], err_msg=k)
  variables, report = swin_conv.official_backbone_variables(official, config)
  assert report['not_in_checkpoint'] == [
      f'norm{i}/{leaf}' for i in (1, 2, 3) for leaf in ('bias', 'scale')]
  assert set(report['unused']) == {
      'backbone.norm.weight', 'backbone.norm.bias',
      'backbone.stages.0.blocks.1.attn_mask'} | {
          k for k in back if k.endswith('relative_position_index')}
  got = jax.tree_util.tree_flatten_with_path(variables['params']['backbone'])[0]
  assert len(got) == report['loaded'] > 0
  for path, leaf in got:
    want = swin_params
    for k in path:
      want = want[k.key]
    np.testing.assert_array_equal(leaf, want)
  # A checkpoint of another window size is refused by name.
  c = config.copy_and_resolve_references()
  c.backbone.window_size = 2
  with pytest.raises(ValueError, match='relative_position_bias_table'):
    swin_conv.official_backbone_variables(official, c)


def test_swinl_manifest_maps_onto_the_real_model():
  """Every tensor of the real Swin-L DDQ-DETR maps onto a parameter of the
  model built from configs/ddq_swinl_4scale.py, with its shape (abstract
  shapes: jax.eval_shape of the whole detector)."""
  with open(os.path.join(DATA, 'state_dict_manifest_swinl.json')) as f:
    manifest = json.load(f)
  tensors = manifest['tensors']
  assert len(tensors) == manifest['num_tensors']
  shapes = unstack_layers(variable_shapes(load_config('ddq_swinl_4scale')))
  want = {p: tuple(x.shape) for p, x in flat_items(shapes)}
  have, ignored = {}, []
  for name, (shape, _) in tensors.items():
    rule, path = match_rule(name, len(shape))
    assert rule is not None, name
    if rule.collection is None:
      ignored.append(name)
      continue
    probe = rule.layout(np.broadcast_to(np.float32(0), shape))
    have[path] = tuple(probe.shape)
  assert set(ignored) == {k for k in tensors
                          if k.endswith('relative_position_index')}
  assert len(ignored) == 24  # one per block, 2 + 2 + 18 + 2
  assert sorted(have) == sorted(want)
  assert {p: s for p, s in have.items() if want[p] != s} == {}
  n_params = sum(int(np.prod(s)) for s in want.values())
  assert n_params == sum(int(np.prod(s)) for k, (s, _) in tensors.items()
                         if k not in ignored)


def test_init_from_official_checkpoint(monkeypatch, tmp_path, config,
                                       swin_state_dict, swin_params):
  """train.init_from=<official Swin .pth> gives the backbone subtree."""
  official = swin_conv.mmdet_to_official(swin_state_dict)
  path = tmp_path / 'swin_official.pth'
  path.write_bytes(b'')
  monkeypatch.setattr(torch_pickle, 'load_torch_checkpoint',
                      lambda p: {'model': official})
  loaded = load_pretrained(str(path), config)
  assert list(loaded['params']) == ['backbone']
  np.testing.assert_array_equal(
      loaded['params']['backbone']['stages_2']['downsample']['reduction']
      ['kernel'], swin_params['stages_2']['downsample']['reduction']['kernel'])


@pytest.mark.slow  # two gradient compiles
def test_with_cp_changes_no_number():
  x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
  one_stage = dict(depths=(2,), num_heads=(1,), strides=(4,),
                   out_indices=(0,))
  plain = _tiny_swin(**one_stage)
  remat = _tiny_swin(with_cp=True, **one_stage)
  params = jax.jit(plain.init)(jax.random.key(1), x)['params']
  loss = lambda m: jax.jit(jax.value_and_grad(lambda p: sum(
      jnp.sum(o ** 2) for o in m.apply({'params': p}, x))))(params)
  (a, ga), (b, gb) = loss(plain), loss(remat)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5,
                                                       atol=1e-6), ga, gb)
