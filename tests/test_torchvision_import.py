"""torchvision ResNet state dicts convert to the same backbone subtree."""
import numpy as np
import pytest

from ddq_jax.io.conversion.torchvision import expected_backbone_shapes, torchvision_resnet_to_variables


def _torchvision_style(tiny_state_dict):
  sd = {k[len('backbone.'):]: v for k, v in tiny_state_dict.items()
        if k.startswith('backbone.')}
  rng = np.random.default_rng(0)
  sd['fc.weight'] = rng.normal(size=(1000, 512)).astype(np.float32)
  sd['fc.bias'] = np.zeros((1000,), np.float32)
  return sd


def _assert_tree_equal(a, b, path=''):
  assert isinstance(a, dict) == isinstance(b, dict), path
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), (path, sorted(set(a) ^ set(b)))
    for k in a:
      _assert_tree_equal(a[k], b[k], f'{path}/{k}')
  else:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def test_torchvision_dict_equals_full_converter(tiny_state_dict,
                                                tiny_variables, tiny_config):
  sd = _torchvision_style(tiny_state_dict)
  assert 'conv1.weight' in sd and 'layer1.0.downsample.1.running_var' in sd
  got = torchvision_resnet_to_variables(
      sd, depth=tiny_config.backbone.depth,
      base_channels=tiny_config.backbone.base_channels)
  _assert_tree_equal(got['params'], tiny_variables['params']['backbone'])
  _assert_tree_equal(got['batch_stats'],
                     tiny_variables['batch_stats']['backbone'])


def test_module_prefix_is_tolerated(tiny_state_dict, tiny_variables):
  sd = {'module.' + k: v for k, v in _torchvision_style(tiny_state_dict).items()}
  got = torchvision_resnet_to_variables(sd, depth=50, base_channels=16)
  _assert_tree_equal(got['params'], tiny_variables['params']['backbone'])


def test_missing_and_unexpected_tensors_are_listed(tiny_state_dict):
  sd = _torchvision_style(tiny_state_dict)
  del sd['layer3.1.bn2.running_mean']
  sd['layer5.0.conv1.weight'] = np.zeros((4, 4, 1, 1), np.float32)
  with pytest.raises(ValueError) as err:
    torchvision_resnet_to_variables(sd, depth=50, base_channels=16)
  msg = str(err.value)
  assert 'missing (1)' in msg and 'batch_stats/layer3_1/bn2/mean' in msg
  assert 'unexpected (1)' in msg and 'layer5_0/conv1/kernel' in msg


def test_wrong_width_is_reported(tiny_state_dict):
  sd = _torchvision_style(tiny_state_dict)
  with pytest.raises(ValueError, match='wrong shape'):
    torchvision_resnet_to_variables(sd, depth=50, base_channels=64)
  with pytest.raises(ValueError, match='missing'):
    torchvision_resnet_to_variables(sd, depth=101, base_channels=16)


def test_expected_shapes_r50():
  shapes = expected_backbone_shapes(depth=50, base_channels=64)
  assert shapes[('params', 'conv1', 'kernel')] == (7, 7, 3, 64)
  assert shapes[('batch_stats', 'layer4_2', 'bn3', 'var')] == (2048,)
  # torchvision resnet50: 53 convs + 53 BNs (x4 tensors) = 265 - fc
  n_params = sum(1 for k in shapes if k[0] == 'params')
  assert n_params == 53 + 53 * 2
