"""Multi-scale deformable attention vs a plain numpy grid_sample reference."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import assert_close
from ddq_jax import backend
from ddq_jax.model.deform_attn import MultiScaleDeformableAttention
from ddq_jax.ops.deform_attn import multi_scale_deformable_attention

SHAPES = ((6, 7), (3, 4), (2, 2), (1, 1))


def _grid_sample_np(img, grid):
  """torch F.grid_sample(bilinear, zeros, align_corners=False), float64.

  img (C, H, W), grid (Q, P, 2) in [-1, 1] (x, y) -> (C, Q, P).
  """
  c, h, w = img.shape
  out = np.zeros((c,) + grid.shape[:2])
  for qi in range(grid.shape[0]):
    for pi in range(grid.shape[1]):
      x = ((grid[qi, pi, 0] + 1) * w - 1) / 2
      y = ((grid[qi, pi, 1] + 1) * h - 1) / 2
      x0, y0 = int(np.floor(x)), int(np.floor(y))
      for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
          if 0 <= xx < w and 0 <= yy < h:
            wgt = (1 - abs(x - xx)) * (1 - abs(y - yy))
            out[:, qi, pi] += wgt * img[:, yy, xx]
  return out


def _msda_np(value, shapes, loc, attn):
  """mmcv multi_scale_deformable_attn_pytorch, transcribed to numpy."""
  value, loc, attn = (np.asarray(a, np.float64) for a in (value, loc, attn))
  b, _, nh, dh = value.shape
  _, q, _, nl, npt, _ = loc.shape
  out = np.zeros((b, nh, dh, q))
  start = 0
  for lvl, (h, w) in enumerate(shapes):
    v = value[:, start:start + h * w]
    start += h * w
    for bi in range(b):
      for hi in range(nh):
        img = v[bi, :, hi].T.reshape(dh, h, w)
        s = _grid_sample_np(img, 2 * loc[bi, :, hi, lvl] - 1)  # (Dh, Q, P)
        out[bi, hi] += (s * attn[bi, :, hi, lvl][None]).sum(-1)
  return out.reshape(b, nh * dh, q).transpose(0, 2, 1)


def _random_inputs(seed, b=2, q=5, nh=2, dh=3, npt=3):
  rng = np.random.default_rng(seed)
  n = sum(h * w for h, w in SHAPES)
  value = rng.normal(size=(b, n, nh, dh)).astype(np.float32)
  # Includes locations outside [0, 1] (partly and fully out of the map).
  loc = rng.uniform(-0.3, 1.3, size=(b, q, nh, len(SHAPES), npt, 2))
  loc = loc.astype(np.float32)
  loc[0, 0, 0, 0, 0] = (0.0, 0.0)
  loc[0, 0, 0, 0, 1] = (1.0, 1.0)
  loc[0, 0, 0, 1, 0] = (0.5, 0.5)
  attn = rng.uniform(size=(b, q, nh, len(SHAPES), npt)).astype(np.float32)
  return value, loc, attn


def test_op_matches_numpy_grid_sample():
  value, loc, attn = _random_inputs(0)
  expected = _msda_np(value, SHAPES, loc, attn)
  fn = jax.jit(lambda v, s, a: multi_scale_deformable_attention(
      v, spatial_shapes=SHAPES, sampling_locations=s, attention_weights=a))
  actual = fn(value, loc, attn)
  assert actual.shape == expected.shape
  assert_close(actual, expected, rel=1e-5, name='msda')
  # Fully out-of-range samples read zeros.
  far = np.full_like(loc, 1.7)
  assert np.abs(np.asarray(fn(value, far, attn))).max() == 0.0


def test_op_gradients_match_numpy():
  value, loc, attn = _random_inputs(1, b=1, q=2, nh=1, dh=2, npt=2)
  f = lambda v, a: multi_scale_deformable_attention(
      v, spatial_shapes=SHAPES, sampling_locations=loc,
      attention_weights=a).sum()
  gv, ga = jax.grad(f, argnums=(0, 1))(value, attn)
  # The op is linear in value and in attention weights: compare with numpy.
  eye_v = np.zeros_like(value)
  eye_v[0, 3, 0, 1] = 1.0
  assert abs(float(gv[0, 3, 0, 1]) - _msda_np(eye_v, SHAPES, loc, attn).sum()) < 1e-5
  d_a = np.zeros_like(attn)
  d_a[0, 1, 0, 2, 1] = 1.0
  assert abs(float(ga[0, 1, 0, 2, 1]) - _msda_np(value, SHAPES, loc, d_a).sum()) < 1e-5


def _dense(x, p):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def _module_np(params, query, value, ref, shapes, mask, pos, nh, nl, npt):
  b, q, c = query.shape
  identity = query
  query = query + pos
  v = _dense(value, params['value_proj'])
  v = np.where(mask[..., None], 0.0, v).reshape(b, -1, nh, c // nh)
  off = _dense(query, params['sampling_offsets']).reshape(b, q, nh, nl, npt, 2)
  aw = _dense(query, params['attention_weights']).reshape(b, q, nh, nl * npt)
  aw = np.exp(aw - aw.max(-1, keepdims=True))
  aw = (aw / aw.sum(-1, keepdims=True)).reshape(b, q, nh, nl, npt)
  if ref.shape[-1] == 2:
    norm = np.array([(w, h) for h, w in shapes], np.float64)
    loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None]
  else:
    loc = (ref[:, :, None, :, None, :2] +
           off / npt * ref[:, :, None, :, None, 2:] * 0.5)
  out = _msda_np(v.astype(np.float64), shapes, loc, aw)
  return _dense(out, params['output_proj']) + identity


def test_module_matches_numpy_reference():
  rng = np.random.default_rng(2)
  b, q, c, nh, npt = 2, 4, 16, 4, 2
  nl = len(SHAPES)
  n = sum(h * w for h, w in SHAPES)
  module = MultiScaleDeformableAttention(embed_dims=c, num_heads=nh,
                                         num_levels=nl, num_points=npt)
  query = rng.normal(size=(b, q, c)).astype(np.float32)
  value = rng.normal(size=(b, n, c)).astype(np.float32)
  pos = rng.normal(size=(b, q, c)).astype(np.float32)
  mask = rng.uniform(size=(b, n)) < 0.3
  ref2 = rng.uniform(size=(b, q, nl, 2)).astype(np.float32)
  ref4 = np.concatenate([ref2, rng.uniform(0.1, 0.6, size=(b, q, nl, 2))],
                        -1).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(0), query, value=value,
                          reference_points=ref2, spatial_shapes=SHAPES)
  # Random (non-zero) parameters everywhere, offsets large enough to leave
  # the map sometimes.
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [jax.random.normal(k, x.shape) * 0.5 for k, x in zip(keys, leaves)]
  variables = jax.tree_util.tree_unflatten(tree, leaves)
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  assert sorted(params) == ['attention_weights', 'output_proj',
                            'sampling_offsets', 'value_proj']
  for ref in (ref2, ref4):
    actual = module.apply(variables, query, value=value, reference_points=ref,
                          spatial_shapes=SHAPES, key_padding_mask=mask,
                          query_pos=pos)
    expected = _module_np(params, query.astype(np.float64),
                          value.astype(np.float64), ref.astype(np.float64),
                          SHAPES, mask, pos.astype(np.float64), nh, nl, npt)
    assert_close(actual, expected, rel=1e-5, name=f'module ref{ref.shape[-1]}')


def test_op_location_gradient_matches_finite_differences():
  """d out / d location (grid_sample's backward), away from cell edges."""
  value, loc, attn = _random_inputs(3, b=1, q=2, nh=2, dh=2, npt=2)
  cot = np.random.default_rng(4).normal(size=(1, 2, 4))
  f = lambda l: (multi_scale_deformable_attention(
      value, spatial_shapes=SHAPES, sampling_locations=l,
      attention_weights=attn) * cot).sum()
  g = np.asarray(jax.grad(f)(loc))
  eps = 1e-4
  for pos in [(0, 1, 0, 0, 1, 0), (0, 0, 1, 1, 0, 1), (0, 1, 1, 2, 1, 0)]:
    d = np.zeros(loc.shape, np.float64)
    d[pos] = eps
    num = (_msda_np(value, SHAPES, loc + d, attn) * cot).sum() - (
        _msda_np(value, SHAPES, loc - d, attn) * cot).sum()
    assert abs(g[pos] - num / (2 * eps)) <= 1e-3 * max(1.0, abs(g[pos])), pos


def test_custom_vjp_equals_autodiff():
  """The op's custom VJP (inputs saved, corners recomputed) gives the same
  value and the same gradients w.r.t. value, locations and weights as plain
  autodiff of the same forward."""
  value, loc, attn = _random_inputs(5, b=2, q=6, nh=2, dh=3, npt=3)
  cot = np.random.default_rng(6).normal(size=(2, 6, 6)).astype(np.float32)

  def f(v, l, a, custom):
    out = multi_scale_deformable_attention(
        v, spatial_shapes=SHAPES, sampling_locations=l, attention_weights=a,
        custom_vjp=custom)
    return (out * cot).sum()

  for custom in (True, False):
    val, grads = jax.jit(jax.value_and_grad(
        lambda v, l, a: f(v, l, a, custom), argnums=(0, 1, 2)))(
            value, loc, attn)
    if custom:
      ref_val, ref_grads = val, grads
  assert_close(val, ref_val, rel=1e-6, name='value')
  for name, a, e in zip(('d value', 'd loc', 'd attn'), grads, ref_grads):
    assert_close(a, e, rel=1e-6, name=name)
  # Residuals of the custom VJP are the inputs only: no array of the
  # gathered size (B*H*Q*K*Dh) is kept between forward and backward.
  _, vjp = jax.vjp(lambda v, l, a: multi_scale_deformable_attention(
      v, spatial_shapes=SHAPES, sampling_locations=l, attention_weights=a),
      value, loc, attn)
  sizes = sorted(x.size for x in jax.tree_util.tree_leaves(vjp))
  assert max(sizes) <= max(value.size, loc.size, attn.size), sizes


def test_query_blocks_equal_unblocked():
  """Sampling the queries in blocks (the TPU's memory choice and the
  CPU's speed choice, backend.deform_attn_query_chunks) gives the same
  value and gradients, with a block count that does not divide the
  queries; the backend picks blocks of 128 queries on the CPU, 8 blocks
  for a TPU target, and 1 for a GPU."""
  value, loc, attn = _random_inputs(7, b=2, q=7, nh=2, dh=3, npt=3)
  cot = np.random.default_rng(8).normal(size=(2, 7, 6)).astype(np.float32)

  def f(v, l, a, chunks):
    out = multi_scale_deformable_attention(
        v, spatial_shapes=SHAPES, sampling_locations=l, attention_weights=a,
        query_chunks=chunks)
    return (out * cot).sum()
  res = {c: jax.jit(jax.value_and_grad(
      lambda v, l, a, c=c: f(v, l, a, c), argnums=(0, 1, 2)))(value, loc, attn)
         for c in (1, 3, 7, 9)}
  for c in (3, 7, 9):
    assert_close(res[c][0], res[1][0], rel=1e-6, name=f'value {c}')
    for name, a, e in zip(('d value', 'd loc', 'd attn'), res[c][1],
                          res[1][1]):
      assert_close(a, e, rel=1e-6, name=f'{name} {c}')
  block = backend.CPU_DEFORM_ATTN_QUERY_BLOCK
  assert backend.deform_attn_query_chunks(block) == 1
  assert backend.deform_attn_query_chunks(block + 1) == 2
  assert backend.deform_attn_query_chunks(22323) == -(-22323 // block)
  with backend.target_platform('tpu'):
    assert backend.deform_attn_query_chunks(7) == 8
  with backend.target_platform('gpu'):
    assert backend.deform_attn_query_chunks(22323) == 1
