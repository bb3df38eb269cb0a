"""The encoder proposals' validity test (0.01 < p < 0.99) sees the same
float32 values as the reference: p = (i + 0.5) / n with one rounding, as
torch divides.  XLA rewrites a division by a broadcast operand into a
multiplication by the reciprocal; then (49 + 0.5) / 50 = 0.98999995 < 0.99
and a level 50 positions long keeps a border row the reference drops (the
cause of coco_eval_tiny image 100070's different detections).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax.model.proposals import exact_divide, gen_encoder_output_proposals


def _reference_valid(valid_hw, shape_hw):
  """(h, w) bool validity of a level whose valid part is valid_hw, in
  IEEE float32 (numpy divides with one rounding, as torch)."""
  vh, vw = valid_hw
  h, w = shape_hw
  lo, hi = np.float32(0.01), np.float32(0.99)
  cy = (np.arange(h, dtype=np.float32) + np.float32(0.5)) / np.float32(vh)
  cx = (np.arange(w, dtype=np.float32) + np.float32(0.5)) / np.float32(vw)
  ok_y = (cy > lo) & (cy < hi)
  ok_x = (cx > lo) & (cx < hi)
  valid = ok_y[:, None] & ok_x[None, :]
  valid[vh:] = False
  valid[:, vw:] = False
  return valid


def _our_valid(memory_mask, shapes, jit):
  b = 1 if memory_mask is None else memory_mask.shape[0]
  n = sum(h * w for h, w in shapes)
  fn = gen_encoder_output_proposals
  if jit:
    fn = jax.jit(fn, static_argnames='spatial_shapes')
  _, props = fn(jnp.zeros((b, n, 4)), memory_mask=memory_mask,
                spatial_shapes=shapes)
  return np.isfinite(np.asarray(props)).all(-1)


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('shape', [(50, 61), (61, 50), (50, 50), (100, 122)])
def test_unmasked_validity_equals_the_reference(shape, jit):
  # (1, 1) first, so that the level under test is level 1 (wh 0.1 inside).
  got = _our_valid(None, ((1, 1), shape), jit)[0, 1:].reshape(shape)
  np.testing.assert_array_equal(got, _reference_valid(shape, shape))


@pytest.mark.parametrize('jit', [False, True])
def test_masked_validity_equals_the_reference(jit):
  """Valid extents read from the mask (padded images): 50 and 40 wide in
  a 60x70 level."""
  h, w = 60, 70
  extents = [(50, 61), (40, 50)]
  mask = np.ones((len(extents), h, w), bool)
  for i, (vh, vw) in enumerate(extents):
    mask[i, :vh, :vw] = False
  flat = np.concatenate([np.zeros((len(extents), 1), bool),
                         mask.reshape(len(extents), -1)], 1)
  got = _our_valid(jnp.asarray(flat), ((1, 1), (h, w)), jit)[:, 1:]
  for i, ext in enumerate(extents):
    np.testing.assert_array_equal(got[i].reshape(h, w),
                                  _reference_valid(ext, (h, w)), err_msg=ext)


def test_exact_divide_rounds_once_under_jit():
  rng = np.random.default_rng(0)
  num = rng.uniform(0, 300, (64, 33)).astype(np.float32)
  den = rng.integers(1, 200, (64, 1)).astype(np.float32)
  got = np.asarray(jax.jit(exact_divide)(num, den))
  np.testing.assert_array_equal(got, num / den)
  scalar = np.float32(50)
  got = np.asarray(jax.jit(exact_divide)(num, scalar))
  np.testing.assert_array_equal(got, num / scalar)
