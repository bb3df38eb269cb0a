"""Swin block pairs stored stacked, scanned (``train.scan_layers``) and
rematerialised (``train.remat.backbone``): the same numbers as the unrolled
scan, the same parameter layout, one traced block pair per scanned stage."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax.compilation_cache import compile_count
from ddq_jax.config import load_config
from ddq_jax.io.conversion.mapping import stack_layers, unstack_layers
from ddq_jax.model import swin

# Stage 0: one block (never scanned); stage 1: five blocks, two (regular,
# shifted) pairs scanned and the odd last block unrolled.  20x28 input: the
# stage maps (5x7, 3x4) are not multiples of the window.
_X = jax.random.normal(jax.random.key(0), (2, 20, 28, 3))


def _model(**kw):
  args = dict(embed_dims=16, depths=(1, 5), num_heads=(1, 2), window_size=2,
              strides=(4, 2), out_indices=(0, 1), drop_path_rate=0.0)
  args.update(kw)
  return swin.SwinTransformer(**args)


@pytest.fixture(scope='module')
def params():
  return jax.jit(_model().init)(jax.random.key(1), _X)['params']


def _loss(model):
  def loss(p):
    outs = model.apply({'params': p}, _X)
    return sum(jnp.sum(o ** 2) * (i + 1) for i, o in enumerate(outs))
  return jax.jit(jax.value_and_grad(loss))


def test_block_pairs_are_stored_stacked(params):
  """Stage 1's two (regular, shifted) pairs are stored stacked, its odd last
  block on its own, whatever scan and remat say; torch's per-block names
  come back at the conversion boundary (mapping.unstack_layers)."""
  scanned = jax.eval_shape(_model(scan=True, remat='full').init,
                           jax.random.key(1), _X)['params']
  assert (jax.tree.structure(scanned) == jax.tree.structure(params))
  assert sorted(params['stages_1']) == ['blocks_4', 'pairs']
  assert sorted(params['stages_0']) == ['blocks_0', 'downsample']
  pairs = params['stages_1']['pairs']
  assert sorted(pairs) == ['regular', 'shifted']
  assert pairs['shifted']['attn']['w_msa']['qkv']['kernel'].shape == (
      2, 32, 96)
  per_block = unstack_layers({'params': {'backbone': params}})['params'][
      'backbone']
  assert sorted(per_block['stages_1']) == ['blocks_0', 'blocks_1', 'blocks_2',
                                           'blocks_3', 'blocks_4']
  np.testing.assert_array_equal(
      per_block['stages_1']['blocks_3']['norm1']['scale'],
      pairs['shifted']['norm1']['scale'][1])
  restacked = stack_layers({'params': {'backbone': per_block}})['params'][
      'backbone']
  assert jax.tree.structure(restacked) == jax.tree.structure(params)


def test_pairs_init_independently(params):
  """One init per pair (stacked_params), as separate blocks would be."""
  kernel = params['stages_1']['pairs']['regular']['ffn']['layers_1']['kernel']
  assert not np.allclose(kernel[0], kernel[1])


def test_scanned_forward_equals_unrolled(params):
  plain = jax.jit(lambda p: _model().apply({'params': p}, _X))(params)
  fn = jax.jit(lambda p: _model(scan=True).apply({'params': p}, _X))
  scanned = fn(params)
  fn(params)
  assert compile_count(fn) == 1
  for a, b in zip(plain, scanned):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_gradients_equal_unrolled(params, remat):
  value, grads = _loss(_model())(params)
  value_s, grads_s = _loss(_model(scan=True, remat=remat))(params)
  np.testing.assert_allclose(value_s, value, rtol=1e-6)

  def close(path, g, h):
    scale = float(np.abs(np.asarray(g)).max()) or 1.0
    err = float(np.abs(np.asarray(h) - np.asarray(g)).max())
    assert err <= 1e-5 * scale, (jax.tree_util.keystr(path), err, scale)
  jax.tree_util.tree_map_with_path(close, grads, grads_s)


def test_scan_traces_one_block_pair():
  """Stage 1 of depth 8 (4 pairs): the jaxpr holds one pair's matmuls (6
  per block) beside stage 0's block and its patch merging, scanned or
  not; with
  ``scan`` the pairs are one loop in the program, else straight-line
  code."""
  x = jnp.zeros((1, 16, 16, 3))
  kw = dict(depths=(1, 8))
  p = jax.eval_shape(_model(**kw).init, jax.random.key(1), x)['params']

  def program(model):
    fn = lambda q: model.apply({'params': q}, x)
    jaxpr = str(jax.make_jaxpr(fn)(p))
    hlo = jax.jit(fn).lower(p).as_text()
    return jaxpr.count('dot_general'), hlo.count('stablehlo.while')
  plain_dots, plain_loops = program(_model(**kw))
  scan_dots, scan_loops = program(_model(scan=True, **kw))
  assert plain_dots == scan_dots == 3 * 6 + 1, (plain_dots, scan_dots)
  assert (plain_loops, scan_loops) == (0, 1)


def test_traced_drop_path_rate_equals_static():
  """A scanned block's traced rate drops the same samples as the static
  attribute, for the same rng (up to float32 rounding: XLA fuses a
  constant and a traced divisor differently)."""
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 16))
  opts = dict(embed_dims=16, num_heads=2, window_size=2,
              feedforward_channels=32, deterministic=False, shift=True)
  rate = float(np.float32(0.4))  # a drop_path_rates() value
  static = swin.SwinBlock(**opts, drop_path_rate=rate)
  traced = swin.SwinBlock(**opts)
  p = jax.jit(static.init)(jax.random.key(1), x)['params']
  rngs = {'dropout': jax.random.key(5)}
  a = jax.jit(lambda q: static.apply({'params': q}, x, rngs=rngs))(p)
  b = jax.jit(lambda q, r: traced.apply({'params': q}, x, r, rngs=rngs))(
      p, jnp.float32(rate))
  np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  zero = jax.jit(lambda q: traced.apply({'params': q}, x, jnp.float32(0.0),
                                        rngs=rngs))(p)
  no_drop = swin.SwinBlock(**dict(opts, deterministic=True))
  e = jax.jit(lambda q: no_drop.apply({'params': q}, x))(p)
  np.testing.assert_allclose(zero, e, rtol=1e-6, atol=1e-6)
  assert not np.allclose(a, e)  # rate 0.4 dropped some samples' branches


def test_scanned_drop_path_in_training(params):
  """Training (a 'dropout' rng): the scanned stage drops paths, differently
  per key, reproducibly per key; rate 0 equals evaluation."""
  model = _model(scan=True, drop_path_rate=0.5)
  train = jax.jit(lambda p, k: model.apply({'params': p}, _X,
                                           rngs={'dropout': k}))
  evaluate = jax.jit(lambda p: model.apply({'params': p}, _X))
  a, a2 = train(params, jax.random.key(2)), train(params, jax.random.key(2))
  b, e = train(params, jax.random.key(3)), evaluate(params)
  np.testing.assert_array_equal(a[1], a2[1])
  assert not np.allclose(a[1], e[1])
  assert not np.allclose(a[1], b[1])
  zero = _model(scan=True)
  np.testing.assert_array_equal(
      jax.jit(lambda p: zero.apply({'params': p}, _X, rngs={
          'dropout': jax.random.key(2)}))(params)[1],
      jax.jit(lambda p: zero.apply({'params': p}, _X))(params)[1])


def test_config_fields():
  c = load_config('ddq_swinl_4scale')
  model = swin.SwinTransformer.from_config(c)
  assert model.scan and model.remat == 'full'
  c.train.scan_layers = False
  c.train.remat.backbone = 'none'
  model = swin.SwinTransformer.from_config(c)
  assert not model.scan and model.remat == 'none'
  assert _model(with_cp=True)._block_remat() == 'full'  # pylint: disable=protected-access
  assert _model(with_cp=True, remat='minimal')._block_remat() == 'minimal'  # pylint: disable=protected-access
