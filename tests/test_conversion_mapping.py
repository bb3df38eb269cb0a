"""The declarative torch -> Flax table covers the real models' manifests;
identical layers (Swin block pairs included) are stacked at the conversion
boundary."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddq_jax.config import load_config
from ddq_jax.io.conversion.converter import convert_checkpoint
from ddq_jax.io.conversion.export import to_reference_names
from ddq_jax.io.conversion.mapping import match_rule, stack_layers, torch_names_by_path, unstack_layers
from ddq_jax.io.conversion.torch_pickle import load_torch_checkpoint, state_dict_of
from ddq_jax.io.conversion.weights_io import save_converted
from ddq_jax.io.weights import load_weights
from ddq_jax.train.checkpoint import load_params_only
from ddq_jax.io.conversion.naming import flax_module_path

DATA = os.path.join(os.path.dirname(__file__), 'data')


def test_naming_rule():
  assert flax_module_path('encoder.layers.0.ffn.layers.0.0') == (
      'encoder', 'layers_0', 'ffn', 'layers_0_0')
  assert flax_module_path('bbox_head.reg_branches.1.4') == (
      'bbox_head', 'reg_branches_1_4')


def test_every_manifest_tensor_has_a_rule():
  for name in ('r50', 'r50_5scale'):
    with open(os.path.join(DATA, f'state_dict_manifest_{name}.json')) as f:
      manifest = json.load(f)
    assert len(manifest['tensors']) == manifest['num_tensors']
    for key, (shape, _dtype) in manifest['tensors'].items():
      rule, _ = match_rule(key, len(shape))
      assert rule is not None, key


def test_tiny_checkpoint_maps_completely(tiny_variables):
  assert tiny_variables['params']['backbone']['conv1']['kernel'].shape == (
      7, 7, 3, 16)
  assert np.isfinite(tiny_variables['params']['level_embed']).all()


def _assert_same_tree(a, b):
  flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert sorted(flat_a, key=str) == sorted(flat_b, key=str)
  for k, x in flat_a.items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_b[k]),
                                  err_msg=jax.tree_util.keystr(k))


def test_identical_layers_are_stacked(tiny_config, tiny_variables):
  """Converted weights hold the encoder / decoder layers and the head's
  branches stacked, entry i being torch's module i; unstacking gives
  torch's per-layer names back, and stacking is idempotent."""
  p = tiny_variables['params']
  n_enc, n_dec = tiny_config.num_encoder_layers, tiny_config.num_decoder_layers
  assert p['encoder']['layers']['norms_0']['scale'].shape[0] == n_enc
  assert p['decoder']['layers']['ffn']['layers_1']['bias'].shape[0] == n_dec
  assert p['bbox_head']['cls_branches']['bias'].shape[0] == n_dec + 2
  assert p['bbox_head']['reg_branches']['4']['kernel'].shape[0] == n_dec + 2
  assert p['bbox_head']['aux_reg_branches']['0']['bias'].shape[0] == n_dec
  per_layer = unstack_layers(tiny_variables)
  q = per_layer['params']
  assert 'layers' not in q['encoder'] and 'cls_branches' not in q['bbox_head']
  np.testing.assert_array_equal(q['decoder']['layers_2']['norms_1']['scale'],
                                p['decoder']['layers']['norms_1']['scale'][2])
  np.testing.assert_array_equal(q['bbox_head']['reg_branches_3_2']['kernel'],
                                p['bbox_head']['reg_branches']['2']['kernel'][3])
  _assert_same_tree(stack_layers(per_layer), tiny_variables)
  _assert_same_tree(stack_layers(tiny_variables), tiny_variables)


def test_stacking_leaves_incomplete_groups_per_layer():
  """A layer missing: the group stays per layer (the fit check then names
  what is missing); a group both stacked and per layer is refused."""
  tree = {'params': {'encoder': {'layers_0': {'w': np.zeros(2)},
                                 'layers_2': {'w': np.zeros(2)}}}}
  assert sorted(stack_layers(tree)['params']['encoder']) == ['layers_0',
                                                             'layers_2']
  tree['params']['encoder']['layers'] = {'w': np.zeros((1, 2))}
  tree['params']['encoder']['layers_1'] = {'w': np.zeros(2)}
  with pytest.raises(ValueError, match='both stacked and per layer'):
    stack_layers(tree)


def test_old_layout_weights_load_converted_once(tmp_path, tiny_config,
                                                tiny_variables):
  """Converted weights written per layer (``encoder/layers_0``, ... as
  before the stacked layout) load as the stacked variables, identical to a
  fresh conversion."""
  out = str(tmp_path / 'old')
  save_converted(out, unstack_layers(tiny_variables), tiny_config)
  variables, _ = load_weights(out)
  _assert_same_tree(variables, tiny_variables)


def test_old_layout_training_run_loads_converted_once(tmp_path,
                                                      tiny_variables):
  """A training checkpoint saved per layer (before the stacked layout)
  gives the stacked variables (``load_params_only``: evaluation,
  ``train.init_from``)."""
  old = unstack_layers(tiny_variables)
  mngr = ocp.CheckpointManager(str(tmp_path), item_names=('state', 'meta'))
  mngr.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'params': old['params'],
                                   'batch_stats': old['batch_stats']}),
      meta=ocp.args.JsonSave({})))
  mngr.wait_until_finished()
  mngr.close()
  _assert_same_tree(load_params_only(str(tmp_path)), tiny_variables)


@pytest.fixture(scope='module')
def swin_variables():
  variables, _, _ = convert_checkpoint(
      os.path.join(DATA, 'tiny_swin', 'checkpoint.pth'))
  return variables


def test_swin_block_pairs_are_stacked(swin_variables):
  """A Swin stage's (regular, shifted) block pairs are stored stacked
  (``stages_i/pairs/{regular, shifted}``, entry k being torch's blocks
  2k / 2k + 1), an odd last block on its own; unstacking gives torch's
  per-block names back (tiny_swin: depths 1, 1, 2, 1)."""
  bb = swin_variables['params']['backbone']
  assert sorted(bb['stages_2']) == ['downsample', 'pairs']
  assert sorted(bb['stages_0']) == ['blocks_0', 'downsample']
  assert sorted(bb['stages_3']) == ['blocks_0']
  pairs = bb['stages_2']['pairs']
  assert pairs['shifted']['attn']['w_msa']['relative_position_bias_table'
                                          ].shape == (1, 49, 4)
  per_block = unstack_layers(swin_variables)['params']['backbone']
  assert sorted(per_block['stages_2']) == ['blocks_0', 'blocks_1',
                                           'downsample']
  np.testing.assert_array_equal(
      per_block['stages_2']['blocks_1']['norm2']['scale'],
      pairs['shifted']['norm2']['scale'][0])
  _assert_same_tree(stack_layers(unstack_layers(swin_variables)),
                    swin_variables)
  _assert_same_tree(stack_layers(swin_variables), swin_variables)


def test_swin_odd_last_block_stays_per_block():
  """Depth 5: blocks 0-3 stack as two pairs, block 4 stays; names and order
  survive the round trip."""
  blocks = {f'blocks_{j}': {'norm1': {'scale': np.full(3, j, np.float32)}}
            for j in range(5)}
  tree = {'params': {'backbone': {'stages_1': blocks}}}
  stacked = stack_layers(tree)['params']['backbone']['stages_1']
  assert sorted(stacked) == ['blocks_4', 'pairs']
  np.testing.assert_array_equal(
      stacked['pairs']['regular']['norm1']['scale'][:, 0], [0, 2])
  np.testing.assert_array_equal(
      stacked['pairs']['shifted']['norm1']['scale'][:, 0], [1, 3])
  _assert_same_tree(unstack_layers(stack_layers(tree)), tree)


def test_swin_old_per_block_weights_load_converted_once(tmp_path,
                                                         swin_variables):
  """Swin weights written per block (``stages_2/blocks_0``, as before the
  pairs were stored stacked) load stacked, identical to a fresh
  conversion."""
  out = str(tmp_path / 'old_swin')
  save_converted(out, unstack_layers(swin_variables), load_config('tiny_swin'))
  variables, _ = load_weights(out)
  _assert_same_tree(variables, swin_variables)


def test_swin_error_messages_name_the_torch_blocks():
  names = torch_names_by_path(state_dict_of(load_torch_checkpoint(
      os.path.join(DATA, 'tiny_swin', 'checkpoint.pth'))))
  path = ('params', 'backbone', 'stages_2', 'pairs', 'shifted', 'norm1',
          'scale')
  assert names[path] == 'backbone.stages.2.blocks.*.norm1.weight'
  assert names[('params', 'backbone', 'stages_3', 'blocks_0', 'norm1',
                'scale')] == 'backbone.stages.3.blocks.0.norm1.weight'


def test_swin_exports_back_to_the_checkpoint(swin_variables):
  """Export (to_reference_names) unstacks the pairs: every tensor of the
  Swin checkpoint comes back bit for bit under its torch name."""
  sd = state_dict_of(load_torch_checkpoint(
      os.path.join(DATA, 'tiny_swin', 'checkpoint.pth')))
  out = to_reference_names(swin_variables, {k: np.ndim(v)
                                            for k, v in sd.items()})
  assert 'backbone.stages.2.blocks.1.attn.w_msa.qkv.weight' in out
  for name, value in out.items():
    np.testing.assert_array_equal(value, np.asarray(sd[name]), err_msg=name)
  mapped = [k for k, v in sd.items()
            if match_rule(k, np.ndim(v))[1][:1] == ('params',)]
  assert sorted(out) == sorted(mapped)
