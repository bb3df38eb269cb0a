"""Deformable encoder and two-stage proposals vs the tiny golden fixture."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import assert_close
from ddq_jax.model.encoder import DeformableEncoder, FFN, get_encoder_reference_points
from ddq_jax.model.proposals import gen_encoder_output_proposals


def _spatial_shapes(infer):
  return tuple((int(h), int(w)) for h, w in infer['spatial_shapes'])


def _encoder_inputs(infer, variables):
  """feat (B, N, C) flattened NCHW neck features; pos (B, N, C)."""
  shapes = _spatial_shapes(infer)
  feats = []
  for lvl, (h, w) in enumerate(shapes):
    f = infer[f'neck_feat_{lvl}']
    assert f.shape[2:] == (h, w)
    feats.append(f.reshape(f.shape[0], f.shape[1], h * w).transpose(0, 2, 1))
  feat = np.concatenate(feats, 1)
  # The fixture's feat_pos is pre_transformer's lvl_pos_embed_flatten: the
  # sine encoding with level_embed[lvl] already added.  Check that, then
  # use it as the encoder's query_pos.
  level_embed = np.asarray(variables['params']['level_embed'])
  pos = infer['feat_pos']
  start = 0
  for lvl, (h, w) in enumerate(shapes):
    sine = pos[:, start:start + h * w] - level_embed[lvl]
    assert np.abs(sine).max() <= 1.0 + 1e-5
    start += h * w
  return feat, pos


@pytest.fixture(scope='module')
def encoder_run(tiny_config, tiny_infer, tiny_variables):
  shapes = _spatial_shapes(tiny_infer)
  feat, pos = _encoder_inputs(tiny_infer, tiny_variables)
  encoder = DeformableEncoder.from_config(tiny_config)
  variables = {'params': tiny_variables['params']['encoder']}
  traces = []

  def run(feat, pos, mask, valid_ratios):
    traces.append(1)
    return encoder.apply(variables, feat, query_pos=pos,
                         key_padding_mask=mask, spatial_shapes=shapes,
                         valid_ratios=valid_ratios)

  fn = jax.jit(run)
  memory = fn(feat, pos, tiny_infer['feat_mask'], tiny_infer['valid_ratios'])
  # Same shapes, new values: no retrace.
  fn(feat + 1.0, pos, tiny_infer['feat_mask'], tiny_infer['valid_ratios'])
  return memory, len(traces)


def test_param_tree_matches_checkpoint(tiny_config, tiny_infer,
                                       tiny_variables):
  shapes = _spatial_shapes(tiny_infer)
  feat, pos = _encoder_inputs(tiny_infer, tiny_variables)
  encoder = DeformableEncoder.from_config(tiny_config)
  init = jax.eval_shape(lambda: encoder.init(
      jax.random.PRNGKey(0), feat, query_pos=pos,
      key_padding_mask=tiny_infer['feat_mask'], spatial_shapes=shapes,
      valid_ratios=tiny_infer['valid_ratios']))
  ours = jax.tree_util.tree_map(lambda x: x.shape, init['params'])
  theirs = jax.tree_util.tree_map(np.shape,
                                  tiny_variables['params']['encoder'])
  assert ours == theirs


def test_reference_points_are_pixel_centres(tiny_infer):
  shapes = _spatial_shapes(tiny_infer)
  ref = np.asarray(get_encoder_reference_points(
      spatial_shapes=shapes, valid_ratios=np.ones((1, len(shapes), 2))))
  h, w = shapes[0]
  assert ref.shape == (1, sum(a * b for a, b in shapes), len(shapes), 2)
  np.testing.assert_allclose(ref[0, w + 2, 0], [2.5 / w, 1.5 / h], rtol=1e-6)


def test_encoder_memory_matches_fixture(encoder_run, tiny_infer):
  memory, num_traces = encoder_run
  assert num_traces == 1
  assert_close(memory, tiny_infer['memory'], name='memory')


def test_proposals_match_fixture(tiny_infer, tiny_variables):
  shapes = _spatial_shapes(tiny_infer)
  params = tiny_variables['params']

  @jax.jit
  def run(memory, mask):
    out_mem, proposals = gen_encoder_output_proposals(
        memory, memory_mask=mask, spatial_shapes=shapes)
    out_mem = nn.Dense(out_mem.shape[-1]).apply(
        {'params': params['memory_trans_fc']}, out_mem)
    out_mem = nn.LayerNorm(epsilon=1e-5).apply(
        {'params': params['memory_trans_norm']}, out_mem)
    return out_mem, proposals

  out_mem, proposals = run(tiny_infer['memory'], tiny_infer['memory_mask'])
  expected = tiny_infer['output_proposals']
  proposals = np.asarray(proposals)
  assert (np.isinf(proposals) == np.isinf(expected)).all()
  assert (proposals[np.isinf(proposals)] > 0).all()
  finite = np.isfinite(expected)
  assert_close(proposals[finite], expected[finite], name='output_proposals')
  assert_close(out_mem, tiny_infer['output_memory'], name='output_memory')


def test_proposals_without_mask_equal_all_valid_mask():
  rng = np.random.default_rng(0)
  shapes = ((4, 5), (2, 3), (1, 1))
  n = sum(h * w for h, w in shapes)
  memory = rng.normal(size=(2, n, 8)).astype(np.float32)
  m1, p1 = gen_encoder_output_proposals(memory, memory_mask=None,
                                        spatial_shapes=shapes)
  m2, p2 = gen_encoder_output_proposals(
      memory, memory_mask=np.zeros((2, n), bool), spatial_shapes=shapes)
  np.testing.assert_array_equal(np.asarray(m1), np.asarray(m2))
  np.testing.assert_array_equal(np.asarray(p1), np.asarray(p2))
  # The 1x1 level's proposal (0.5, 0.5, 0.2, 0.2) is valid; a 0.05 * 2**lvl
  # box at level 2 is 0.2 wide.
  np.testing.assert_allclose(
      1 / (1 + np.exp(-np.asarray(p1)[0, -1])), [0.5, 0.5, 0.2, 0.2],
      rtol=1e-6)


def test_ffn_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  ffn = FFN(embed_dims=8, feedforward_channels=16)
  v = ffn.init(jax.random.PRNGKey(0), x)
  p = v['params']
  expected = x + np.maximum(
      x @ p['layers_0_0']['kernel'] + p['layers_0_0']['bias'],
      0) @ p['layers_1']['kernel'] + p['layers_1']['bias']
  np.testing.assert_allclose(np.asarray(ffn.apply(v, x)), expected,
                             rtol=1e-5, atol=1e-5)
  assert sorted(p) == ['layers_0_0', 'layers_1']


def test_proposals_from_our_memory_match_fixture(encoder_run, tiny_infer):
  """End to end: our encoder's memory through the proposal generator."""
  memory, _ = encoder_run
  out_mem, proposals = gen_encoder_output_proposals(
      memory, memory_mask=tiny_infer['memory_mask'],
      spatial_shapes=_spatial_shapes(tiny_infer))
  expected_mem = np.where(np.isinf(tiny_infer['output_proposals']).any(-1,
                          keepdims=True), 0.0, tiny_infer['memory'])
  assert_close(out_mem, expected_mem, name='output_memory_before_fc')
  np.testing.assert_array_equal(np.asarray(proposals),
                                np.asarray(gen_encoder_output_proposals(
                                    tiny_infer['memory'],
                                    memory_mask=tiny_infer['memory_mask'],
                                    spatial_shapes=_spatial_shapes(
                                        tiny_infer))[1]))
