"""The declarative torch -> Flax table covers the real models' manifests."""
import json
import os

import numpy as np

from ddq_jax.io.conversion.mapping import match_rule
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
