"""`verify --steps N`: six optimiser steps against the reference's own
(tests/data/tiny_trajectory: mmengine's OptimWrapper, AdamW, backbone lr x0.1,
clipping at 0.1, frozen stem / layer1 / BatchNorm, constant lr 1e-4).

The end-to-end test runs the project's jitted train step six times (one
compilation, ~2 minutes on a 2-core CPU); the others are fast unit checks of
the pieces: torch's AdamW rounding, the export to reference names, the
settings, the denoising draws, the comparisons and the command line."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ddq_jax.io.conversion.export import to_reference_names
from ddq_jax.parity import trajectory, trajectory_compare, verify
from ddq_jax.train.optimizer import torch_adamw

DATA = os.path.join(os.path.dirname(__file__), 'data')
BUNDLE = os.path.join(DATA, 'tiny_trajectory')


def _npz(path):
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


# ------------------------------------------------------------- end to end
@pytest.fixture(scope='module')
def six_steps(tmp_path_factory):
  """The command as a user runs it, in its own process: without the
  suite's 8 fake CPU devices, whose thread partitioning changes XLA's float32
  rounding, and the targets here are about one float32 ulp of the smallest
  parameter changes."""
  dump = str(tmp_path_factory.mktemp('trajectory') / 'ours.npz')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (root, env.get('PYTHONPATH', '')) if p)
  run = subprocess.run(
      [sys.executable, '-m', 'ddq_jax.parity.verify', BUNDLE, '--steps', '6',
       '--dump', dump], env=env, capture_output=True, text=True, check=False)
  assert run.returncode in (0, 1), run.stderr[-2000:]
  return run.returncode == 0, run.stdout.splitlines(), _npz(dump)


def test_six_steps_within_target(six_steps):
  ok, lines, _ = six_steps
  failures = [l for l in lines if l.startswith('FAIL')]
  assert ok and not failures, '\n'.join(failures)
  assert any('compiled 1 time(s)' in l for l in lines)
  assert any(l.startswith('ok   param/backbone.conv1.weight (frozen)')
             for l in lines)
  assert any(l.startswith('ok   frozen params') for l in lines)
  assert any(l.startswith('ok   dn queries == ground truth') for l in lines)
  assert lines[-2].startswith('79 of 79'), lines[-2]
  assert sum('bit-identical' in l for l in lines) == 7


def test_dump_layout(six_steps, tiny_state_dict):
  _, _, dumped = six_steps
  ref = _npz(os.path.join(BUNDLE, 'trajectory.npz'))
  for key in ref:
    if key.startswith(('loss', 'grad_global_norm')):
      assert dumped[key].shape == (6,), key
  params = {k[len('param/'):]: v for k, v in dumped.items()
            if k.startswith('param/')}
  want = {k for k in tiny_state_dict
          if not k.endswith(('running_mean', 'running_var',
                             'num_batches_tracked'))}
  assert set(params) == want
  for name, value in params.items():
    assert value.shape == tiny_state_dict[name].shape, name
  for key in ref:
    if key.startswith('param/'):
      assert dumped[key].shape == ref[key].shape, key


# ------------------------------------------------------------ the optimiser
def _torch_float32(p, grads, *, lr, wd):
  """numpy float32, in torch._single_tensor_adam's order (decoupled decay)."""
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, g in enumerate(grads, start=1):
    p = p * np.float32(1 - lr * wd)
    m = m + np.float32(1 - 0.9) * (g - m)
    v = v * np.float32(0.999) + np.float32(1 - 0.999) * g * g
    step_size = np.float32(lr / (1 - 0.9 ** t))
    denom = np.sqrt(v) / np.float32((1 - 0.999 ** t) ** 0.5) + np.float32(1e-8)
    p = p + (-step_size * m) / denom
  return p


def test_torch_adamw_rounds_like_torch():
  """torch's decoupled decay and update order, within what float32
  guarantees on any host: per element and step, half an ulp of the stored
  value plus the rounding of the update itself (a handful of float32
  operations on a value of at most a few lr).  How many entries are
  bit-identical depends on the host CPU's code (FMA contraction); it is
  printed, not asserted."""
  rng = np.random.default_rng(0)
  p0 = (rng.normal(size=20000) * 0.5).astype(np.float32)
  grads = [(rng.normal(size=p0.shape) * 1e-5).astype(np.float32)
           for _ in range(6)]
  lr, wd, steps = 1e-5, 0.05, len(grads)
  tx = optax.inject_hyperparams(torch_adamw, static_args=('b1', 'b2', 'eps'))(
      learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)

  @jax.jit
  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  for g in grads:
    p, state = step(jnp.asarray(g), state, p)
  p = np.asarray(p)
  want = _torch_float32(p0, grads, lr=lr, wd=wd)
  err = np.abs(p.astype(np.float64) - want)
  bound = steps * (np.spacing(np.abs(want)).astype(np.float64)
                   + 64 * np.finfo(np.float32).eps * 3 * lr)
  print(f'torch_adamw: {np.mean(p == want):.2%} bit-identical to torch\'s '
        f'order, max {np.max(err / np.spacing(np.abs(want))):.1f} ulp')
  assert np.all(err <= bound), float(np.max(err / bound))
  # A wrong decay convention (optax.adamw's lr * wd * p inside the update
  # is the same maths; no decay at all is not) is far outside the bound.
  tx_nodecay = optax.inject_hyperparams(
      torch_adamw, static_args=('b1', 'b2', 'eps'))(
          learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  q, s = jnp.asarray(p0), tx_nodecay.init(jnp.asarray(p0))
  for g in grads:
    u, s = tx_nodecay.update(jnp.asarray(g), s, q)
    q = optax.apply_updates(q, u)
  assert np.mean(np.abs(np.asarray(q, np.float64) - want) > bound) > 0.5


# ------------------------------------------------------------ the pieces
def test_export_inverts_the_converter(tiny_state_dict, tiny_variables):
  names = {k: v.ndim for k, v in tiny_state_dict.items()}
  back = to_reference_names(tiny_variables, names)
  assert set(back) == {k for k in names if not k.endswith(
      'num_batches_tracked')}
  for name, value in back.items():
    np.testing.assert_array_equal(value, tiny_state_dict[name], err_msg=name)
  only = to_reference_names(tiny_variables, names, collections=('params',))
  assert 'backbone.bn1.running_mean' not in only
  assert 'backbone.bn1.weight' in only
  with pytest.raises(KeyError, match='query_map.weight'):
    to_reference_names({'params': {}}, {'query_map.weight': 2})


def test_settings_overrides():
  with open(os.path.join(BUNDLE, 'trajectory.json')) as f:
    settings = json.load(f)
  assert trajectory.settings_overrides(settings) == {
      'optim.decay_epochs': (), 'optim.lr': 1e-4, 'optim.weight_decay': 0.05,
      'optim.clip_norm': 0.1, 'optim.backbone_lr_mult': 0.1,
      'optim.warmup_steps': 0, 'dn.label_noise_scale': 1e-12,
      'dn.box_noise_scale': 1e-12}
  assert trajectory.settings_overrides({}) == {}
  for bad in ({'optim_wrapper': {'optimizer': {'type': 'SGD'}}},
              {'optim_wrapper': {'paramwise_cfg': {'custom_keys': {
                  'neck': {'lr_mult': 0.5}}}}},
              {'warmup': {'type': 'LinearLR'}}):
    with pytest.raises(trajectory.TrajectoryInputError):
      trajectory.settings_overrides(bad)


def test_bundle_files_sibling_variant(tmp_path):
  files = trajectory.bundle_files(BUNDLE)
  assert files['checkpoint'].endswith(os.path.join('tiny', 'checkpoint.pth'))
  assert files['trajectory'] and files['settings']['steps'] == 6
  lonely = tmp_path / 'lonely'
  lonely.mkdir()
  shutil.copy(os.path.join(BUNDLE, 'trajectory.json'), lonely)
  with pytest.raises(FileNotFoundError, match='checkpoint.pth'):
    trajectory.bundle_files(str(lonely))


def test_dn_noise_check(tiny_inputs):
  batch = trajectory.fixed_batch(tiny_inputs)
  c = ml_collections.ConfigDict(dict(num_classes=80, dn=dict(
      num_dn_queries=20, label_noise_scale=1e-12, box_noise_scale=1e-12)))
  keys = [jax.random.PRNGKey(i) for i in range(3)]
  assert trajectory.dn_noise_check(c, batch, keys) == {
      'label_mismatches': 0, 'box_max_abs': 0.0}
  c.dn.label_noise_scale, c.dn.box_noise_scale = 0.5, 1.0
  noisy = trajectory.dn_noise_check(c, batch, keys)
  assert noisy['label_mismatches'] > 0 and noisy['box_max_abs'] > 0.01


def test_comparisons_catch_misses():
  ref = {'loss_total': np.array([2.0, 1.0]), 'loss/a': np.array([1.0, 0.5]),
         'grad_global_norm': np.array([3.0, 3.0]),
         'init/w': np.zeros(3, np.float32), 'param/w': np.ones(3, np.float32),
         'init/f': np.ones(2, np.float32), 'param/f': np.ones(2, np.float32)}
  ours = {'loss_total': np.array([2.0 * (1 + 2e-4), 1.0]),
          'loss/a': np.array([1.0, 0.5 * (1 + 2e-3)]),
          'grad_global_norm': np.array([3.0, 3.0])}
  bad = {r.key for r in trajectory_compare.compare_history(ours, ref, steps=2)
         if not r.ok}
  assert bad == {'loss_total step 1', 'loss/a steps 2-2'}
  start = {'w': ref['init/w'], 'f': ref['init/f']}
  final = {'w': np.full(3, 1.0005, np.float32),
           'f': np.nextafter(ref['init/f'], 2)}
  res = {r.key: r.ok for r in trajectory_compare.compare_params(final, start, ref,
                                                        steps=2)}
  assert res == {'init/w': True, 'param/w (update)': True, 'init/f': True,
                 'param/f (frozen)': False}
  # The whole update off by 2e-3 of itself: beyond the budget.
  final['w'] = np.full(3, 1.002, np.float32)
  res = {r.key: r.ok for r in trajectory_compare.compare_params(final, start, ref,
                                                        steps=2)}
  assert not res['param/w (update)']


def test_update_tolerance_floor():
  """The float32 floor: half an ulp per element and step can always be
  lost in storage, so a tensor whose update is a few ulps of its values
  gets a tolerance of that size."""
  init = np.full(100, 1.0, np.float32)
  final = init + np.float32(2 ** -20)  # 8 ulps of 1.0
  tol = trajectory_compare.update_tolerance(final, init, steps=4, budget=1e-3)
  assert tol == pytest.approx(1e-3 + 4 * 2 ** -23 / 2 ** -20)
  assert trajectory_compare.update_error(final, final, init) == 0.0


def test_cli_errors(tmp_path, capsys):
  assert verify.main([BUNDLE, '--steps', '2', '--config.no_such_field=1']) == 2
  assert 'no_such_field' in capsys.readouterr().err
  assert verify.main([str(tmp_path), '--steps', '2']) == 2
  assert 'checkpoint.pth' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    verify.main([BUNDLE, '--steps', '2', '--bogus'])
  with pytest.raises(SystemExit):
    verify.main([BUNDLE, '--steps', '2', '--train'])
