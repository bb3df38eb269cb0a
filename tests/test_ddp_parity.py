"""The per-device loss on a 2-device mesh against mmdetection's own step on
two GPUs under DDP (tests/data/tiny_ddp, recorded by its
``record_reference.py``): four images, two per device, whose ground-truth
counts differ between the devices (6 / 3 and 2 / 1), so each device has its
own denoising groups (3 and 10) and slot layout.  Every loss term of each
device, their mean (what the step logs and differentiates), the denoising
layout and attention mask of each device, and DDP's averaged gradient match
within the fixtures' tolerances (``parity/compare.py``)."""
import os

import jax
import numpy as np
import pytest

from ddq_jax.config import load_config
from ddq_jax.io.conversion.mapping import unstack_layers
from ddq_jax.io.weights import load_weights
from ddq_jax.model.denoising import build_self_attn_mask
from ddq_jax.model.detector import build_model
from ddq_jax.parity import verify
from ddq_jax.parity.compare import compare
from ddq_jax.train import objective
from ddq_jax.train.parallel import mesh as mesh_lib
from ddq_jax.train.parallel import sharding as shd

DATA = os.path.join(os.path.dirname(__file__), 'data')
BUNDLE = os.path.join(DATA, 'tiny_ddp')
DEVICES = 2


def _npz(path):
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _config(solver):
  # The reference's batched padding (one 128x128 canvas on both GPUs) and
  # its recorded noise scales (1e-12: the dn queries are the ground truth).
  return load_config('tiny', {'padding_invariant': False,
                              'dn.label_noise_scale': 1e-12,
                              'dn.box_noise_scale': 1e-12,
                              'loss.hungarian_solver': solver})


def _run(solver):
  config = _config(solver)
  variables, config = load_weights(
      os.path.join(DATA, 'tiny', 'checkpoint.pth'), config)
  inputs = verify.bundle_inputs(_npz(os.path.join(BUNDLE, 'inputs.npz')))
  batch = verify.training_batch(inputs)
  mesh = mesh_lib.make_mesh(config, jax.devices()[:DEVICES])
  assert dict(mesh.shape) == {'data': DEVICES, 'model': 1}
  loss_fn = objective.make_loss_fn(build_model(config), config, mesh=mesh)
  assert loss_fn.criterion_config.solver == solver

  def obj(params, batch_stats, batch, rng):
    per, dn = loss_fn.per_device(params, batch_stats, batch, rng)
    loss, terms = objective.mean_over_devices(per)
    return loss, (per, terms, dn)

  params = jax.device_put(variables['params'], shd.replicated(mesh))
  (loss, (per, terms, dn)), grads = jax.device_get(jax.jit(
      jax.value_and_grad(obj, has_aux=True))(
          params, variables['batch_stats'], shd.shard_batch(batch, mesh),
          jax.random.key(0)))
  return config, loss, per, terms, dn, grads


def _check(config, loss, per, terms, dn, grads):
  ref = _npz(os.path.join(BUNDLE, 'train.npz'))
  results = []
  for r in range(DEVICES):
    # The denoising layout of each device is the reference's for its images.
    groups = int(dn['num_groups'][r])
    used = int(dn['num_queries'][r])
    assert groups == int(ref[f'gpu{r}/dn_num_groups'])
    assert used == int(ref[f'gpu{r}/dn_num_queries'])
    d = dn['slot_in_range'].shape[-1]
    assert int(dn['slot_in_range'][r].sum()) == used
    s = np.arange(d)
    slot_group = np.where(s < used, s // (used // groups), -1)
    # The generator's mask (DDQ appends the dense block after it).
    mask = np.asarray(build_self_attn_mask(
        slot_group, num_matching=int(config.num_queries)))
    keep = np.r_[0:used, d:mask.shape[0]]
    ref_mask = ref[f'gpu{r}/dn_attn_mask']
    assert ref_mask.shape == (len(keep), len(keep))
    np.testing.assert_array_equal(mask[np.ix_(keep, keep)], ref_mask)
    for k in (k for k in ref if k.startswith(f'gpu{r}/loss/')):
      name = k[len(f'gpu{r}/'):]
      results.append(compare(k, per[name[len('loss/'):]][r], ref[k]))
  assert int(ref['gpu0/dn_num_groups']) != int(ref['gpu1/dn_num_groups'])
  for k in (k for k in ref if k.startswith('loss/')):
    results.append(compare(k, terms[k[len('loss/'):]], ref[k]))
  results.append(compare('loss_total', loss, np.mean(
      [ref[f'gpu{r}/loss_total'] for r in range(DEVICES)])))
  per_layer = unstack_layers({'params': grads})['params']
  for k in (k for k in ref if k.startswith('grad/')):
    g = verify.grad_of(per_layer, k[len('grad/'):], ref[k])
    assert g is not None, k
    results.append(compare(k, g, ref[k]))
  results.append(compare('grad_global_norm', verify.global_norm(grads),
                         ref['grad_global_norm']))
  for c in results:
    print(c.line())
  worst = {u: max((c for c in results if c.key.startswith(u)),
                  key=lambda c: c.error / c.tolerance)
           for u in ('gpu', 'loss', 'grad')}
  print({u: (c.key, f'{c.error:.3g}') for u, c in worst.items()})
  assert all(c.ok for c in results), [c.line() for c in results if not c.ok]


@pytest.mark.parametrize('solver', [
    'scipy',
    pytest.param('jax', marks=pytest.mark.skipif(
        not os.environ.get('DDQ_SLOW_TESTS'),
        reason='a second compile of the tiny step (~1 min on 2 cores); set '
        'DDQ_SLOW_TESTS=1'))])
def test_two_devices_equal_reference_ddp(solver):
  _check(*_run(solver))
