"""Optimiser: mmengine schedule values, frozen/backbone groups, torch AdamW
+ clip_grad_norm_ reproduced step by step (numpy reference of torch's code)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax.config import complete_config
from ddq_jax.model.variables import variable_shapes
from ddq_jax.train import flat_optimizer as fo
from ddq_jax.train import optimizer as opt
from ddq_jax.tree_paths import leaf_paths, split


def _config(**optim):
  return complete_config(dict(backbone=dict(frozen_stages=1), optim=dict(dict(
      lr=2e-4, weight_decay=0.05, backbone_lr_mult=0.1, clip_norm=0.1,
      warmup_steps=2000, warmup_factor=1e-4, epochs=12, decay_epochs=(11,),
      decay_factor=0.1), **optim)))


def _mmengine_lrs(n, *, base, start, end_iter, milestones, gamma):
  """mmengine's chainable LinearLR + MultiStepLR, stepped after each iter."""
  total = end_iter - 1
  lr = base * start  # LinearLR at last_step 0
  out = [lr]
  for last_step in range(1, n):
    if last_step < end_iter and last_step <= total:  # LinearLR active
      lr = lr * (1.0 + (1.0 - start) /
                 (total * start + (last_step - 1) * (1.0 - start)))
    if last_step in milestones:
      lr = lr * gamma
    out.append(lr)
  return np.array(out)


def test_schedule_matches_mmengine():
  spe = 200
  config = _config()
  sched = opt.make_schedule(config, spe)
  n = 11 * spe + 50
  ref = _mmengine_lrs(n, base=2e-4, start=1e-4, end_iter=2000,
                      milestones={11 * spe}, gamma=0.1)
  ours = np.array(jax.jit(jax.vmap(sched))(jnp.arange(n)))
  np.testing.assert_allclose(ours, ref, rtol=2e-5)
  assert np.isclose(ours[0], 2e-8)
  assert np.isclose(ours[1], 2e-4 * (1e-4 + (1 - 1e-4) / 1999), rtol=1e-5)
  assert np.isclose(ours[1999], 2e-4) and np.isclose(ours[2000], 2e-4)
  assert np.isclose(ours[11 * spe - 1], 2e-4)
  assert np.isclose(ours[11 * spe], 2e-5)


def _tree():
  k = lambda *s: np.full(s, 0.5, np.float32)
  return {
      'backbone': {
          'conv1': {'kernel': k(3, 3, 3, 4)}, 'bn1': {'scale': k(4), 'bias': k(4)},
          'layer1_0': {'conv1': {'kernel': k(1, 1, 4, 4)},
                       'bn1': {'scale': k(4), 'bias': k(4)}},
          'layer2_0': {'conv1': {'kernel': k(1, 1, 4, 8)},
                       'bn1': {'scale': k(8), 'bias': k(8)},
                       'downsample_0': {'kernel': k(1, 1, 4, 8)},
                       'downsample_1': {'scale': k(8), 'bias': k(8)}}},
      'neck': {'convs_0': {'conv': {'kernel': k(1, 1, 8, 6), 'bias': k(6)},
                           'gn': {'scale': k(6), 'bias': k(6)}}},
      'level_embed': k(2, 6),
  }


def test_labels():
  labels = opt.param_labels(_tree(), _config())
  b = labels['backbone']
  assert b['conv1']['kernel'] == b['bn1']['scale'] == 'frozen'
  assert b['layer1_0']['conv1']['kernel'] == 'frozen'
  assert b['layer2_0']['conv1']['kernel'] == 'backbone'
  assert b['layer2_0']['downsample_0']['kernel'] == 'backbone'
  assert b['layer2_0']['bn1']['scale'] == 'frozen'          # BN requires_grad=False
  assert b['layer2_0']['downsample_1']['bias'] == 'frozen'
  assert labels['neck']['convs_0']['gn']['scale'] == 'default'
  assert labels['level_embed'] == 'default'
  c = _config()
  c.backbone.frozen_stages = -1
  c.backbone.bn_trainable = True
  lb = opt.param_labels(_tree(), c)['backbone']
  assert lb['conv1']['kernel'] == lb['layer1_0']['bn1']['scale'] == 'backbone'


def _torch_reference(params, grads_seq, labels, lrs, *, wd, max_norm, mult):
  """numpy transcription of clip_grad_norm_ + torch.optim.AdamW (foreach=False)."""
  flat_p, treedef = jax.tree.flatten(params)
  flat_l = jax.tree.leaves(labels)
  p = [np.array(x, np.float64) for x in flat_p]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = [np.array(x, np.float64) for x in jax.tree.leaves(grads)]
    live = [i for i, l in enumerate(flat_l) if l != 'frozen']  # grad is None
    norm = np.sqrt(sum((g[i] ** 2).sum() for i in live))
    coef = min(1.0, max_norm / (norm + 1e-6))
    for i in live:
      gi = g[i] * coef
      lr_i = lr * (mult if flat_l[i] == 'backbone' else 1.0)
      p[i] = p[i] * (1 - lr_i * wd)
      m[i] = 0.9 * m[i] + 0.1 * gi
      v[i] = 0.999 * v[i] + 0.001 * gi * gi
      mh = m[i] / (1 - 0.9 ** t)
      vh = v[i] / (1 - 0.999 ** t)
      p[i] = p[i] - lr_i * mh / (np.sqrt(vh) + 1e-8)
  return jax.tree.unflatten(treedef, p)


@pytest.mark.parametrize('flat_update', [True, False])
def test_adamw_matches_torch_and_frozen_untouched(flat_update):
  """Flat (one vector per lr group) and per-parameter updates alike."""
  config = _config(warmup_steps=3, warmup_factor=0.5, decay_epochs=(1,),
                   flat_update=flat_update)
  params = jax.tree.map(jnp.asarray, _tree())
  tx, sched = opt.make_optimizer(config, steps_per_epoch=3)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(
      rng.normal(size=x.shape).astype(np.float32) * s), params)
      for s in (0.01, 3.0, 0.05, 1.0)]  # some steps clip, some do not
  p = params
  lrs = []
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for i, g in enumerate(grads_seq):
    upd, state = step(g, state, p)
    p = optax_apply(p, upd)
    lrs.append(float(sched(i)))
    got = opt.current_lrs(state)
    assert np.isclose(got['lr'], lrs[-1], rtol=1e-6)
    assert np.isclose(got['lr_backbone'], 0.1 * lrs[-1], rtol=1e-6)
  np.testing.assert_allclose(lrs, [1e-4, 1.5e-4, 2e-4, 2e-5], rtol=1e-6)
  ref = _torch_reference(params, grads_seq, opt.param_labels(params, config),
                         lrs, wd=0.05, max_norm=0.1, mult=0.1)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-9)
  # Frozen: bit-identical, and no optimiser state for them.
  bb, bb0 = p['backbone'], params['backbone']
  for path in (('conv1', 'kernel'), ('bn1', 'scale'), ('layer1_0', 'conv1', 'kernel'),
               ('layer2_0', 'bn1', 'scale'), ('layer2_0', 'downsample_1', 'bias')):
    a, b = bb, bb0
    for k in path:
      a, b = a[k], b[k]
    assert np.array_equal(np.asarray(a), np.asarray(b)), path
  n_trainable = sum(int(np.prod(x.shape)) for x, l in zip(
      jax.tree.leaves(params), jax.tree.leaves(opt.param_labels(params, config)))
      if l != 'frozen')
  n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)
                if np.ndim(x) > 0)
  assert n_state == 2 * n_trainable, (n_state, n_trainable)  # mu + nu only


def optax_apply(p, u):
  return optax.apply_updates(p, u)


def test_labels_on_real_model(tiny_config):
  """On the detector's tree: frozen = stem + layer1 + every backbone BN;
  the backbone group = conv kernels of layers 2-4; nothing else frozen."""
  params = variable_shapes(tiny_config)['params']
  labels = opt.param_labels(params, tiny_config)
  flat = {split(p): l for p, l in zip(leaf_paths(labels),
                                      jax.tree.leaves(labels))}
  for path, label in flat.items():
    if path[0] != 'backbone':
      assert label == 'default', path
    elif path[1] in ('conv1', 'bn1') or path[1].startswith('layer1_'):
      assert label == 'frozen', path
    elif path[2].startswith('bn') or path[2] == 'downsample_1':
      assert label == 'frozen', path
    else:
      assert label == 'backbone' and path[-1] == 'kernel', path
  counts = {l: sum(v == l for v in flat.values())
            for l in ('frozen', 'backbone', 'default')}
  print(counts)
  # Layers 2-4: block 0's 3 convs + downsample, blocks 1.. stacked (3 convs).
  assert counts['backbone'] == 3 * (3 + 1 + 3)


def test_flat_moments_and_their_checkpoint_layout():
  """Flat moments (one vector per lr group) hold the per-parameter moments
  in vector order; the checkpoint layout is per parameter; converting there
  and back is the identity, and a per-parameter state's canonical form is
  itself."""
  params = jax.tree.map(jnp.asarray, _tree())
  rng = np.random.default_rng(1)
  g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)
                                         .astype(np.float32)), params)
  states = {}
  for flat in (True, False):
    tx, _ = opt.make_optimizer(_config(warmup_steps=3, flat_update=flat),
                               steps_per_epoch=3)
    s = tx.init(params)
    _, s = jax.jit(lambda g, s, p: tx.update(g, s, p))(g, s, params)
    states[flat] = s
  flat, per = states[True], states[False]
  assert isinstance(flat.mu, fo.FlatMoments)
  assert [k for k, _ in flat.mu.layout] == ['default', 'backbone']
  canon = fo.canonical_opt_state(flat, params)
  assert fo.canonical_opt_state(per, params) is per
  leaves = lambda t: jax.tree.leaves(  # noqa: E731
      t, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  for a, b in zip(leaves(canon.mu) + leaves(canon.nu),
                  leaves(per.mu) + leaves(per.nu)):
    if isinstance(b, optax.MaskedNode):
      assert isinstance(a, optax.MaskedNode)
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                 atol=1e-12)
  back = fo.from_canonical_opt_state(canon, flat)
  for a, b in zip(back.mu.vectors + back.nu.vectors,
                  flat.mu.vectors + flat.nu.vectors):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # the state's own shape check: moments made for other parameters
  other = dict(params, extra=jnp.zeros((3, 3), jnp.float32))
  tx, _ = opt.make_optimizer(_config(), steps_per_epoch=3)
  with pytest.raises(ValueError, match='moments layout differs'):
    tx.step(jax.tree.map(jnp.zeros_like, other), flat, other)


import optax  # noqa: E402
