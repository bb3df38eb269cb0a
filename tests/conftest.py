"""Shared fixtures: the tiny golden bundle and its converted weights."""
import os

# 8 fake CPU devices for the sharding tests; must precede the first jax import.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ddq_jax.config import load_config  # noqa: E402
from ddq_jax.io.conversion.mapping import convert_state_dict  # noqa: E402
from ddq_jax.io.conversion.torch_pickle import (  # noqa: E402
    load_torch_checkpoint, state_dict_of)

DATA = os.path.join(os.path.dirname(__file__), 'data')
TINY = os.path.join(DATA, 'tiny')


def load_npz(name, bundle=TINY):
  """{key: array} of ``bundle/name`` (a fixture's .npz)."""
  with np.load(os.path.join(bundle, name), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


_npz = load_npz


@pytest.fixture(scope='session')
def tiny_dir():
  return TINY


@pytest.fixture(scope='session')
def tiny_config():
  """The tiny config in the reference's batched-padding mode: what the
  tiny/ batch fixture (two images on one padded canvas) computes."""
  return load_config('tiny', {'padding_invariant': False})


@pytest.fixture(scope='session')
def tiny_inputs():
  return _npz('inputs.npz')


@pytest.fixture(scope='session')
def tiny_infer():
  return _npz('infer.npz')


@pytest.fixture(scope='session')
def tiny_train():
  return _npz('train.npz')


@pytest.fixture(scope='session')
def tiny_state_dict():
  return state_dict_of(load_torch_checkpoint(os.path.join(TINY, 'checkpoint.pth')))


@pytest.fixture(scope='session')
def tiny_variables(tiny_state_dict):
  """{'params': ..., 'batch_stats': ...} of the whole model, numpy leaves."""
  variables, _, unmapped = convert_state_dict(tiny_state_dict)
  assert not unmapped, unmapped
  return variables


def assert_close(actual, expected, *, rel=1e-4, name=''):
  """Max abs error <= rel * (max |expected|, at least 1e-6): the parity
  targets' 'relative to the tensor's scale' (ddq_jax/parity/compare.py)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  scale = max(float(np.abs(expected).max()) if expected.size else 0.0, 1e-6)
  err = float(np.abs(actual - expected).max()) if expected.size else 0.0
  assert err <= rel * scale, f'{name}: max abs err {err:.3g} > {rel} * {scale:.3g}'
