"""Rematerialisation and layer scans change memory and compile time, never
values: the tiny fixture's training loss and every gradient are the same
(1e-6 relative, per gradient leaf in norm) with remat none / minimal / full
and the encoder and decoder layers scanned or unrolled, and the scanned
model reads the converted checkpoint as it is."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax.model.detector import build_model
from ddq_jax.model import remat as remat_lib
from ddq_jax.model.remat import checkpoint_policy, remat_name, scan_layers
from ddq_jax.train.objective import make_loss_fn

TRAIN_INPUTS = ('images', 'pad_mask', 'img_shapes', 'gt_boxes', 'gt_labels',
                'gt_valid')


def _config(tiny_config, remat, scan):
  c = tiny_config.copy_and_resolve_references()
  for part in ('encoder', 'decoder', 'backbone'):
    c.train.remat[part] = remat
  c.train.scan_layers = scan
  return c


def _loss_and_grads(config, variables, inputs):
  model = build_model(config)
  loss_fn = make_loss_fn(model, config)
  batch = {k: inputs[k] for k in TRAIN_INPUTS}
  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, terms), grads = fn(variables['params'], variables['batch_stats'],
                            batch, jax.random.key(0))
  return jax.tree.map(np.asarray, (loss, terms, grads))


@pytest.fixture(scope='module')
def reference_run(tiny_config, tiny_variables, tiny_inputs):
  return _loss_and_grads(_config(tiny_config, 'none', False), tiny_variables,
                         tiny_inputs)


def _assert_same(run, ref):
  loss, terms, grads = run
  ref_loss, ref_terms, ref_grads = ref
  assert np.isfinite(ref_loss)
  assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (loss, ref_loss)
  for k in ref_terms:
    assert abs(terms[k] - ref_terms[k]) <= 1e-6 * max(abs(ref_terms[k]),
                                                      1e-6), k
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  ref_flat = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
  assert len(flat) == len(ref_flat)
  # Per leaf, float64: the error's norm within 1e-6 of the gradient's norm
  # (recomputation changes XLA's fusion, hence float32 rounding: the worst
  # element of a conv kernel's gradient moves by ~1e-6 of its largest).
  for path, g in flat:
    e = np.asarray(ref_flat[path], np.float64)
    d = np.asarray(g, np.float64) - e
    norm = max(float(np.linalg.norm(e)), 1e-30)
    name = jax.tree_util.keystr(path)
    assert float(np.linalg.norm(d)) <= 1e-6 * norm or not e.any(), name
    assert float(np.abs(d).max()) <= 3e-6 * max(float(np.abs(e).max()),
                                                1e-30), name


def test_full_remat_and_scan_equal_plain(tiny_config, tiny_variables,
                                         tiny_inputs, reference_run):
  run = _loss_and_grads(_config(tiny_config, 'full', True), tiny_variables,
                        tiny_inputs)
  _assert_same(run, reference_run)


@pytest.mark.slow
def test_minimal_remat_equals_plain(tiny_config, tiny_variables, tiny_inputs,
                                    reference_run):
  run = _loss_and_grads(_config(tiny_config, 'minimal', True),
                        tiny_variables, tiny_inputs)
  _assert_same(run, reference_run)


def test_policy_names(tiny_config):
  assert checkpoint_policy('none') is None
  assert checkpoint_policy('full') is not None
  with pytest.raises(ValueError, match='remat policy'):
    checkpoint_policy('most')
  c = tiny_config.copy_and_resolve_references()
  c.train.remat.decoder = 'sometimes'
  with pytest.raises(ValueError, match="'sometimes'"):
    remat_name(c, 'decoder')
  assert scan_layers(tiny_config) is True


def test_stacked_init_draws_as_unstacked_submodules():
  """Layer l of stacked parameters holds what a submodule named like the
  unstacked layer (``layers_{l}``, or the names given) would draw from the
  same key: the initial values do not depend on how layers are stored."""
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='b')(nn.Dense(3, name='a')(x))

  class Unstacked(nn.Module):
    @nn.compact
    def __call__(self, x):
      for l in range(3):
        x = Layer(name=f'layers_{l}')(x)
      return Layer(name='extra_1')(Layer(name='extra_0')(x))

  class Stacked(nn.Module):
    @nn.compact
    def __call__(self, x):
      p = remat_lib.stacked_params(self, 'layers', Layer(parent=None), 3, x)
      q = remat_lib.stacked_params(self, 'extra', Layer(parent=None), 2, x,
                                   layer_names=['extra_0', 'extra_1'])
      return p, q

  x = jnp.ones((1, 3))
  key = jax.random.key(7)
  ref = Unstacked().init(key, x)['params']
  stacked = Stacked().init(key, x)['params']
  for group, names in (('layers', [f'layers_{l}' for l in range(3)]),
                       ('extra', ['extra_0', 'extra_1'])):
    for l, name in enumerate(names):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[l], b),
                   stacked[group], ref[name])
  # applying reads the stored parameters (flax only checks their shapes)
  p, _ = Stacked().apply({'params': stacked}, x)
  jax.tree.map(np.testing.assert_array_equal, p, stacked['layers'])
