"""``init_variables`` reproduces the reference's initialisation
(DDQDETR.init_weights and what it calls: DDQDETRHead.init_weights, mmcv
MultiScaleDeformableAttention.init_weights, the transformer's xavier pass,
ResNet / ChannelMapper init_cfg, torch defaults elsewhere)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax.config import load_config
from ddq_jax.io.conversion.mapping import stack_layers, unstack_layers
from ddq_jax.model.detector import build_model
from ddq_jax.model.variables import init_variables


@pytest.fixture(scope='module')
def setup():
  config = load_config('tiny')
  model = build_model(config)
  variables = init_variables(model, config, jax.random.key(0))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  # Checked per layer, under torch's names (encoder/layers_0, ...).
  return config, model, unstack_layers(variables)


def _leaves(tree, prefix=''):
  """{'a/b/c': array} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_leaves(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = np.asarray(v)
  return out


def _mmcv_grid(num_heads, num_levels, num_points):
  """mmcv MultiScaleDeformableAttention.init_weights' sampling_offsets bias,
  transcribed: thetas = arange(H) * 2 pi / H; grid = (cos, sin) / max|.|,
  repeated over levels and points, point i scaled by i + 1; view(-1)."""
  grid = np.zeros((num_heads, num_levels, num_points, 2), np.float32)
  for h in range(num_heads):
    theta = np.float32(h) * np.float32(2.0 * math.pi / num_heads)
    d = np.array([np.cos(theta), np.sin(theta)], np.float32)
    d = d / np.abs(d).max()
    for lvl in range(num_levels):
      for i in range(num_points):
        grid[h, lvl, i] = d * (i + 1)
  return grid.reshape(-1)


def _assert_uniform(x, bound, name):
  """Values within +-bound and filling it (a uniform draw, not zeros)."""
  x = np.asarray(x)
  assert np.abs(x).max() <= bound * (1 + 1e-6), (name, np.abs(x).max(), bound)
  if x.size >= 256:
    assert np.abs(x).max() > 0.9 * bound, (name, np.abs(x).max(), bound)
    # U(-b, b) has std b / sqrt(3).
    np.testing.assert_allclose(x.std(), bound / math.sqrt(3), rtol=0.15,
                               err_msg=name)


def test_head_branches(setup):
  config, _, v = setup
  head = v['params']['bbox_head']
  c, k, n = config.embed_dims, config.num_classes, config.num_decoder_layers
  cls_names = ([f'cls_branches_{i}' for i in range(n + 2)] +
               [f'aux_cls_branches_{i}' for i in range(n)])
  reg_names = ([f'reg_branches_{i}' for i in range(n + 2)] +
               [f'aux_reg_branches_{i}' for i in range(n)])
  prior = -math.log((1 - 0.01) / 0.01)
  for name in cls_names:
    np.testing.assert_allclose(head[name]['bias'], np.full(k, prior),
                               rtol=1e-6, err_msg=name)
    _assert_uniform(head[name]['kernel'], 1 / math.sqrt(c), name)
    # Every branch is a deepcopy of one Linear in the reference.
    np.testing.assert_array_equal(head[name]['kernel'],
                                  head[cls_names[0]]['kernel'])
  for name in reg_names:
    last = head[f'{name}_4']
    assert last['kernel'].shape == (c, 4)
    assert not np.any(last['kernel']) and not np.any(last['bias']), name
    for j in ('0', '2'):
      layer = head[f'{name}_{j}']
      _assert_uniform(layer['kernel'], 1 / math.sqrt(c), f'{name}_{j}')
      _assert_uniform(layer['bias'], 1 / math.sqrt(c), f'{name}_{j}')
      ref = head[f'{reg_names[0]}_{j}']
      np.testing.assert_array_equal(layer['kernel'], ref['kernel'])
      np.testing.assert_array_equal(layer['bias'], ref['bias'])


def _msda_modules(params):
  out = {}
  for part, key in (('encoder', 'self_attn'), ('decoder', 'cross_attn')):
    for name, layer in params[part].items():
      if name.startswith('layers_'):
        out[f'{part}/{name}/{key}'] = layer[key]
  return out


def test_deformable_attention(setup):
  config, _, v = setup
  c = config.embed_dims
  grid = _mmcv_grid(config.num_heads, config.num_levels, config.num_points)
  msda = _msda_modules(v['params'])
  assert len(msda) == config.num_encoder_layers + config.num_decoder_layers
  for name, m in msda.items():
    np.testing.assert_array_equal(m['sampling_offsets']['bias'], grid,
                                  err_msg=name)
    assert not np.any(m['sampling_offsets']['kernel']), name
    assert not np.any(m['attention_weights']['kernel']), name
    assert not np.any(m['attention_weights']['bias']), name
    for proj in ('value_proj', 'output_proj'):
      assert not np.any(m[proj]['bias']), (name, proj)
      _assert_uniform(m[proj]['kernel'], math.sqrt(6 / (c + c)),
                      f'{name}/{proj}')


def test_transformer_xavier_and_torch_biases(setup):
  config, _, v = setup
  p = v['params']
  c, f = config.embed_dims, config.ffn_dims
  for part in ('encoder', 'decoder'):
    ffn = p[part]['layers_0']['ffn']
    _assert_uniform(ffn['layers_0_0']['kernel'], math.sqrt(6 / (c + f)),
                    f'{part} ffn0')
    _assert_uniform(ffn['layers_1']['kernel'], math.sqrt(6 / (c + f)),
                    f'{part} ffn1')
    # Biases are never re-initialised: torch's U(+-1/sqrt(fan_in)).
    _assert_uniform(ffn['layers_0_0']['bias'], 1 / math.sqrt(c),
                    f'{part} ffn0 bias')
    _assert_uniform(ffn['layers_1']['bias'], 1 / math.sqrt(f),
                    f'{part} ffn1 bias')
  attn = p['decoder']['layers_1']['self_attn']['attn']
  _assert_uniform(attn['in_proj']['kernel'], math.sqrt(6 / (c + 3 * c)),
                  'in_proj')
  _assert_uniform(attn['out_proj']['kernel'], math.sqrt(6 / (c + c)),
                  'out_proj')
  assert not np.any(attn['in_proj']['bias'])
  assert not np.any(attn['out_proj']['bias'])
  ref_head = p['decoder']['ref_point_head']
  _assert_uniform(ref_head['layers_0']['kernel'], math.sqrt(6 / (2 * c + c)),
                  'ref_point_head 0')
  _assert_uniform(ref_head['layers_0']['bias'], 1 / math.sqrt(2 * c),
                  'ref_point_head 0 bias')
  _assert_uniform(ref_head['layers_1']['kernel'], math.sqrt(6 / (2 * c)),
                  'ref_point_head 1')
  _assert_uniform(p['memory_trans_fc']['kernel'], math.sqrt(6 / (2 * c)),
                  'memory_trans_fc')
  _assert_uniform(p['memory_trans_fc']['bias'], 1 / math.sqrt(c),
                  'memory_trans_fc bias')
  # query_map is never re-initialised: torch's nn.Linear default.
  _assert_uniform(p['query_map']['kernel'], 1 / math.sqrt(c), 'query_map')
  _assert_uniform(p['query_map']['bias'], 1 / math.sqrt(c), 'query_map bias')
  leaves = _leaves(p)
  for name, x in leaves.items():
    if name.endswith('/scale') and ('norm' in name):
      np.testing.assert_array_equal(x, 1.0, err_msg=name)  # LayerNorm
    if (name.endswith('/bias') and 'norm' in name
        and not name.startswith('backbone')):
      assert not np.any(x), name


def test_embeddings_standard_normal(setup):
  _, _, v = setup
  p = v['params']
  level_embed = p['level_embed']
  assert abs(level_embed.std() - 1) < 0.15 and abs(level_embed.mean()) < 0.15
  label = p['dn_query_generator']['label_embedding']['embedding']
  assert abs(label.std() - 1) < 0.05 and abs(label.mean()) < 0.05
  # Untruncated normal (torch normal_): tails beyond 2 sigma exist.
  assert np.abs(label).max() > 3


def test_backbone_and_neck(setup):
  config, _, v = setup
  p, stats = v['params'], v['batch_stats']
  for name, x in _leaves(p['backbone']).items():
    if name.endswith('kernel'):
      kh, kw, _, cout = x.shape
      std = math.sqrt(2 / (kh * kw * cout))  # kaiming normal, fan_out
      if x.size >= 4096:
        np.testing.assert_allclose(x.std(), std, rtol=0.1, err_msg=name)
        assert np.abs(x).max() > 2.5 * std, name  # not truncated at 2 sigma
    elif name.endswith('scale'):
      last_bn = name.endswith('bn3/scale')  # zero_init_residual
      np.testing.assert_array_equal(x, 0.0 if last_bn else 1.0, err_msg=name)
    elif name.endswith('bias'):
      assert not np.any(x), name
  for name, x in _leaves(stats['backbone']).items():
    np.testing.assert_array_equal(x, 1.0 if name.endswith('var') else 0.0,
                                  err_msg=name)
  c = config.embed_dims
  for name, mod in p['neck'].items():
    np.testing.assert_array_equal(mod['gn']['scale'], 1.0, err_msg=name)
    assert not np.any(mod['gn']['bias']), name
    kh, kw, cin, cout = mod['conv']['kernel'].shape
    assert cout == c
    _assert_uniform(mod['conv']['kernel'],
                    math.sqrt(6 / (kh * kw * (cin + cout))), name)


def test_initial_class_scores_near_prior(setup):
  """From the reference's init every class starts near p = 0.01 (the
  focal losses start small), encoder proposals and decoder layers alike."""
  _, model, v = setup
  size = 64
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(1, size, size, 3)), jnp.float32)
  pad_mask = jnp.zeros((1, size, size), bool)
  out = jax.jit(lambda v, x, m: model.apply(v, x, m))(stack_layers(v), images,
                                                      pad_mask)
  scores = jax.nn.sigmoid(out.cls_logits)
  mean = float(scores.mean())
  assert 0.005 < mean < 0.03, mean
  assert float(scores.max()) < 0.5
