"""convert_weights: the tiny checkpoint, the real models' manifests, bad input."""
import json
import os
import shutil

import numpy as np
import pytest

from ddq_jax.config import load_config
from ddq_jax.io.conversion import cli, weights_io
from ddq_jax.io.conversion.converter import ConversionError, convert_checkpoint, convert_state_dict_checked
from ddq_jax.io.conversion.mmdet_config import ConfigParseError, config_from_mmdet
from ddq_jax.io.conversion.torch_pickle import CheckpointReadError

DATA = os.path.join(os.path.dirname(__file__), 'data')


def test_tiny_checkpoint_converts_with_its_own_config(tiny_dir, tiny_variables):
  variables, config, report = convert_checkpoint(
      os.path.join(tiny_dir, 'checkpoint.pth'))
  assert report.ok and report.converted == 453
  assert all('num_batches_tracked' in k for k in report.ignored)
  # Every architectural size comes from the checkpoint's meta['cfg'].
  tiny = load_config('tiny')
  for key in ('embed_dims', 'num_levels', 'num_queries', 'num_encoder_layers',
              'num_decoder_layers', 'ffn_dims', 'max_per_img'):
    assert config[key] == tiny[key], key
  assert config.backbone.base_channels == 16
  np.testing.assert_array_equal(
      variables['params']['bbox_head']['reg_branches']['4']['kernel'][1],
      tiny_variables['params']['bbox_head']['reg_branches']['4']['kernel'][1])


@pytest.mark.parametrize('manifest,config', [('r50', 'ddq_r50_4scale'),
                                              ('r50_5scale', 'ddq_r50_5scale')])
def test_published_models_map_completely(manifest, config):
  with open(os.path.join(DATA, f'state_dict_manifest_{manifest}.json')) as f:
    tensors = json.load(f)['tensors']
  state_dict = {k: np.zeros(shape, np.float32) for k, (shape, _) in
                tensors.items()}
  _, report = convert_state_dict_checked(state_dict, load_config(config))
  assert report.ok, report.describe()
  assert set(report.ignored) == {k for k in tensors
                                 if k.endswith('num_batches_tracked')}


def test_published_config_texts_parse():
  text = open(os.path.join(DATA, 'tiny', 'mmdet_config.py')).read()
  five = text.replace('num_outs=4', 'num_outs=5').replace(
      'num_levels=4', 'num_levels=5')
  assert config_from_mmdet(five).num_levels == 5


def test_other_architecture_lists_misshaped(tiny_dir):
  with pytest.raises(ConversionError) as e:
    convert_checkpoint(os.path.join(tiny_dir, 'checkpoint.pth'),
                       load_config('ddq_r50_4scale'))
  msg = str(e.value)
  assert 'mis-shaped' in msg and 'backbone.conv1.weight' in msg


def test_bad_files(tmp_path, tiny_dir):
  not_ckpt = tmp_path / 'x.pth'
  not_ckpt.write_text('{"hello": 1}')
  with pytest.raises(CheckpointReadError, match='not a PyTorch'):
    convert_checkpoint(str(not_ckpt))
  truncated = tmp_path / 't.pth'
  raw = open(os.path.join(tiny_dir, 'checkpoint.pth'), 'rb').read()
  truncated.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(CheckpointReadError):
    convert_checkpoint(str(truncated))
  with pytest.raises(ConfigParseError, match='expected .DDQDETR'):
    config_from_mmdet("model = dict(type='DINO')")


def test_cli_round_trip(tmp_path, tiny_dir, capsys):
  out = tmp_path / 'weights'
  assert cli.main([os.path.join(tiny_dir, 'checkpoint.pth'), '--out',
                   str(out)]) == 0
  variables, config = weights_io.load_converted(str(out))
  assert config.embed_dims == 64
  assert variables['params']['level_embed'].shape == (4, 64)
  assert cli.main([str(tmp_path / 'missing.pth'), '--out', str(out)]) == 2
  assert 'no such file' in capsys.readouterr().err
  shutil.rmtree(out)
