"""Feature masks, sine positions, valid ratios and flattening (pre_transformer)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from ddq_jax.model.multiscale import prepare_multiscale_inputs
from ddq_jax.model.positional_encoding import interpolate_mask_nearest, nearest_source_indices, sine_positional_encoding, valid_ratio


def _neck_feats(tiny_infer, num_levels):
  return [jnp.asarray(tiny_infer[f'neck_feat_{i}'].transpose(0, 2, 3, 1))
          for i in range(num_levels)]


@pytest.fixture(scope='module')
def ms(tiny_config, tiny_variables, tiny_inputs, tiny_infer):
  # Inputs are the reference's own neck outputs, so this tests only the
  # pre_transformer step.
  return prepare_multiscale_inputs(
      _neck_feats(tiny_infer, tiny_config.num_levels),
      pad_mask=jnp.asarray(tiny_inputs['pad_mask']),
      level_embed=jnp.asarray(tiny_variables['params']['level_embed']),
      temperature=tiny_config.pos_temperature, offset=tiny_config.pos_offset)


def test_static_shapes_match_reference(ms, tiny_infer):
  assert ms.spatial_shapes == tuple(
      tuple(int(v) for v in s) for s in tiny_infer['spatial_shapes'])
  assert ms.level_start_index == tuple(
      int(v) for v in tiny_infer['level_start_index'])
  assert all(isinstance(v, int) for s in ms.spatial_shapes for v in s)


def test_mask_pos_ratios_match_reference(ms, tiny_infer):
  np.testing.assert_array_equal(np.asarray(ms.mask_flatten),
                                tiny_infer['feat_mask'])
  assert ms.mask_flatten.dtype == jnp.bool_
  # feat_pos in the fixture is lvl_pos_embed_flatten (pos + level_embed).
  assert_close(ms.lvl_pos_embed_flatten, tiny_infer['feat_pos'], rel=1e-4,
               name='feat_pos')
  assert_close(ms.valid_ratios, tiny_infer['valid_ratios'], rel=1e-6,
               name='valid_ratios')


def test_feat_flatten_is_level_major_row_major(ms, tiny_infer):
  b, c = 2, 64
  expected = np.concatenate(
      [tiny_infer[f'neck_feat_{i}'].reshape(b, c, -1).transpose(0, 2, 1)
       for i in range(4)], axis=1)
  np.testing.assert_array_equal(np.asarray(ms.feat_flatten), expected)


def test_jittable_with_static_metadata(tiny_config, tiny_variables,
                                       tiny_inputs, tiny_infer):
  feats = _neck_feats(tiny_infer, tiny_config.num_levels)
  fn = jax.jit(lambda f, m, e: prepare_multiscale_inputs(
      f, pad_mask=m, level_embed=e, temperature=tiny_config.pos_temperature,
      offset=tiny_config.pos_offset))
  out = fn(feats, jnp.asarray(tiny_inputs['pad_mask']),
           jnp.asarray(tiny_variables['params']['level_embed']))
  assert out.level_start_index == (0, 256, 320, 336)
  assert_close(out.lvl_pos_embed_flatten, tiny_infer['feat_pos'],
               name='feat_pos (jit)')


def _torch_nearest_reference(in_size, out_size):
  """ATen UpSample.h nearest_idx, written out independently."""
  out = []
  for d in range(out_size):
    if out_size == in_size:
      out.append(d)
    elif out_size == 2 * in_size:
      out.append(d >> 1)
    else:
      scale = np.float32(np.float32(in_size) / np.float32(out_size))
      out.append(min(int(math.floor(np.float32(np.float32(d) * scale))),
                     in_size - 1))
  return np.array(out)


@pytest.mark.parametrize('in_size,out_size', [
    (101, 13), (101, 26), (100, 13), (7, 3), (5, 10), (5, 8), (26, 22),
    (1333, 167), (1333, 21)])
def test_nearest_rule_on_odd_sizes(in_size, out_size):
  got = nearest_source_indices(in_size=in_size, out_size=out_size)
  np.testing.assert_array_equal(got, _torch_nearest_reference(in_size,
                                                              out_size))
  if out_size < in_size:
    # Not ceil(img / stride): e.g. 101 -> 13 samples rows 0, 7, 15, ..., 93.
    assert got[0] == 0 and got[-1] <= in_size - 1


def test_nearest_float32_quirk():
  # 11 * float32(26/22) = 12.9999996 in float32: torch samples row 12, the
  # exact rational floor(11 * 26 / 22) would be 13.
  assert nearest_source_indices(in_size=26, out_size=22)[11] == 12


def test_odd_canvas_mask_and_ratio():
  # 101 x 77 canvas, one image of 60 x 77 (padded rows), one of 101 x 50.
  mask = np.ones((2, 101, 77), bool)
  mask[0, :60, :] = False
  mask[1, :, :50] = False
  small = np.asarray(interpolate_mask_nearest(jnp.asarray(mask), size=(13, 10)))
  rows = _torch_nearest_reference(101, 13)
  cols = _torch_nearest_reference(77, 10)
  np.testing.assert_array_equal(small, mask[:, rows][:, :, cols])
  # rows sampled: 0, 7, 15, 23, 31, 38, 46, 54, 62, ... -> 8 valid of 13.
  assert int((~small[0, :, 0]).sum()) == int((rows < 60).sum()) == 8
  ratios = np.asarray(valid_ratio(jnp.asarray(small)))
  np.testing.assert_allclose(ratios[0], [1.0, 8 / 13])
  np.testing.assert_allclose(ratios[1], [int((cols < 50).sum()) / 10, 1.0])


def test_unpadded_batch_equals_reference_no_mask_branch():
  """No padding: the reference encodes arange(1..H) positions, no mask."""
  b, h, w, nf, t = 2, 5, 7, 8, 20.
  pos = np.asarray(sine_positional_encoding(
      jnp.zeros((b, h, w), bool), num_feats=nf, temperature=t))
  y = np.arange(1, h + 1, dtype=np.float32)[:, None].repeat(w, 1)
  x = np.arange(1, w + 1, dtype=np.float32)[None].repeat(h, 0)
  y = y / (np.float32(h) + 1e-6) * np.float32(2 * math.pi)
  x = x / (np.float32(w) + 1e-6) * np.float32(2 * math.pi)
  dim_t = np.float32(t) ** (2 * (np.arange(nf) // 2) / nf).astype(np.float32)
  def enc(v):
    p = v[..., None] / dim_t
    return np.stack([np.sin(p[..., 0::2]), np.cos(p[..., 1::2])],
                    -1).reshape(h, w, -1)
  expected = np.concatenate([enc(y), enc(x)], -1)
  for i in range(b):
    assert_close(pos[i], expected, rel=1e-5, name='pos')
  feats = [jnp.ones((b, 4, 4, 2 * nf))]
  out = prepare_multiscale_inputs(feats, pad_mask=jnp.zeros((b, 16, 16), bool),
                                  level_embed=jnp.zeros((1, 2 * nf)))
  assert not bool(out.mask_flatten.any())
  np.testing.assert_array_equal(np.asarray(out.valid_ratios), 1.0)
