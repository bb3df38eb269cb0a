"""ResNet backbone + ChannelMapper neck against the tiny reference fixture."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from ddq_jax.model.resnet import ResNet, resnet_out_channels
from ddq_jax.model.neck import ChannelMapper


def _sub(variables, name):
  out = {'params': variables['params'][name]}
  if name in variables.get('batch_stats', {}):
    out['batch_stats'] = variables['batch_stats'][name]
  return out


@pytest.fixture(scope='module')
def features(tiny_config, tiny_variables, tiny_inputs):
  backbone = ResNet.from_config(tiny_config)
  neck = ChannelMapper.from_config(tiny_config)
  feats = backbone.apply(_sub(tiny_variables, 'backbone'),
                         jnp.asarray(tiny_inputs['images']))
  outs = neck.apply(_sub(tiny_variables, 'neck'), feats)
  return feats, outs


def test_backbone_matches_reference(features, tiny_infer, tiny_config):
  feats, _ = features
  assert len(feats) == len(tiny_config.backbone.out_indices) == 3
  for i, f in enumerate(feats):
    expected = tiny_infer[f'backbone_feat_{i}'].transpose(0, 2, 3, 1)
    assert_close(f, expected, rel=1e-4, name=f'backbone_feat_{i}')


def test_neck_matches_reference(features, tiny_infer, tiny_config):
  _, outs = features
  assert len(outs) == tiny_config.num_levels
  for i, f in enumerate(outs):
    expected = tiny_infer[f'neck_feat_{i}'].transpose(0, 2, 3, 1)
    assert_close(f, expected, rel=1e-4, name=f'neck_feat_{i}')


def test_out_channels_from_config(tiny_config):
  b = tiny_config.backbone
  assert resnet_out_channels(depth=b.depth, base_channels=b.base_channels,
                             out_indices=b.out_indices) == (128, 256, 512)
  assert resnet_out_channels(depth=18, base_channels=64,
                             out_indices=(0, 1, 2, 3)) == (64, 128, 256, 512)


def test_param_tree_matches_checkpoint(tiny_config, tiny_variables):
  """Our init creates exactly the converted checkpoint's names and shapes."""
  backbone = ResNet.from_config(tiny_config)
  x = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), x))
  ours = jax.tree_util.tree_map(lambda s: s.shape, shapes)
  ref = jax.tree_util.tree_map(np.shape, _sub(tiny_variables, 'backbone'))
  assert ours == ref
  neck = ChannelMapper.from_config(tiny_config)
  feats = [jnp.zeros((1, 8 // 2**i, 8 // 2**i, c))
           for i, c in enumerate(backbone.out_channels)]
  shapes = jax.eval_shape(lambda: neck.init(jax.random.PRNGKey(0), feats))
  ours = jax.tree_util.tree_map(lambda s: s.shape, shapes)
  ref = jax.tree_util.tree_map(np.shape, _sub(tiny_variables, 'neck'))
  assert ours == ref


@pytest.mark.parametrize('depth', [18, 34])
def test_basic_block_depths_build(depth):
  model = ResNet(depth=depth, base_channels=8, out_indices=(0, 1, 2, 3))
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  params = shapes['params']
  assert 'conv3' not in params['layer1_0']
  assert 'downsample_0' not in params['layer1_0']   # 8 -> 8, stride 1
  assert params['layer2_0']['downsample_0']['kernel'].shape == (1, 1, 8, 16)
  outs = jax.eval_shape(lambda: model.apply(model.init(
      jax.random.PRNGKey(0), x), x))
  assert [o.shape for o in outs] == [(1, 8, 8, 8), (1, 4, 4, 16),
                                     (1, 2, 2, 32), (1, 1, 1, 64)]


def test_frozen_stages_get_no_gradient(tiny_config, tiny_variables,
                                       tiny_inputs):
  backbone = ResNet.from_config(tiny_config)
  assert tiny_config.backbone.frozen_stages == 1
  variables = jax.tree_util.tree_map(jnp.asarray,
                                     _sub(tiny_variables, 'backbone'))
  x = jnp.asarray(tiny_inputs['images'][:1, :64, :64])

  def loss(params):
    outs = backbone.apply({'params': params,
                           'batch_stats': variables['batch_stats']}, x)
    return sum(jnp.sum(o ** 2) for o in outs)

  grads = jax.grad(loss)(variables['params'])
  norm = lambda t: float(sum(jnp.abs(l).sum()
                             for l in jax.tree_util.tree_leaves(t)))
  assert norm(grads['conv1']) == 0.0
  # Blocks 1.. of a stage are stacked: layer4_tail[1] is torch's layer4.2.
  assert norm(grads['layer1_0']) == 0.0 and norm(grads['layer1_tail']) == 0.0
  assert norm(grads['layer2_0']['conv1']) > 0.0
  assert norm(grads['layer4_tail']['conv3']['kernel'][1]) > 0.0
  # BN affine parameters are frozen (reference: requires_grad=False).
  assert norm(grads['layer4_tail']['bn3']) == 0.0


def test_jit_compiles_once_per_shape(tiny_config, tiny_variables):
  backbone = ResNet.from_config(tiny_config)
  neck = ChannelMapper.from_config(tiny_config)
  bvars = _sub(tiny_variables, 'backbone')
  nvars = _sub(tiny_variables, 'neck')
  traces = []

  @jax.jit
  def forward(bv, nv, images):
    traces.append(images.shape)
    return neck.apply(nv, backbone.apply(bv, images))

  a = jnp.zeros((1, 64, 64, 3))
  b = jnp.ones((1, 64, 64, 3))
  c = jnp.zeros((1, 64, 96, 3))
  forward(bvars, nvars, a)
  forward(bvars, nvars, b)
  assert len(traces) == 1
  outs = forward(bvars, nvars, c)
  assert len(traces) == 2
  forward(bvars, nvars, c + 1)
  assert len(traces) == 2
  assert [o.shape[1:3] for o in outs] == [(8, 12), (4, 6), (2, 3), (1, 2)]
