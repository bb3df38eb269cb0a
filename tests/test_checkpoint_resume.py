"""Kill-and-resume gives the same losses as an uninterrupted run; restoring
into another mesh works; retention and atomicity."""
import os
import signal
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import standin  # noqa: E402
import jax.numpy as jnp
import optax

from ddq_jax.train.parallel import mesh as mesh_lib
from ddq_jax.train.parallel import sharding as shd
from ddq_jax.io import weight_formats
from ddq_jax.io.conversion.mapping import unstack_layers
from ddq_jax.train import checkpoint_layout
from ddq_jax.train.checkpoint import Checkpointer, StateMismatchError
from ddq_jax.train.checkpoint import load_params_only
from ddq_jax.model.variables import variable_shapes
from ddq_jax.train import loop
from ddq_jax.train import optimizer as opt
from ddq_jax.train import state as state_lib
from ddq_jax.train.loop import Components, train


@pytest.fixture(scope='module')
def uninterrupted():
  s = standin.setup(standin.config(), jax.devices())
  _, losses = standin.run_steps(s, s['state'], 0, 6)
  return losses


def test_kill_and_resume_same_losses(tmp_path, uninterrupted):
  config = standin.config(checkpoint_every=3, keep_checkpoints=2)
  ckpt_dir = str(tmp_path / 'ckpt')
  s = standin.setup(config, jax.devices())
  ck = Checkpointer(ckpt_dir, save_every=3, keep=2)
  state, first = standin.run_steps(s, s['state'], 0, 3, checkpointer=ck,
                                   config=config)
  ck.wait()
  del state, s, ck  # "kill": nothing survives but the directory

  s2 = standin.setup(config, jax.devices(), seed=123)  # different fresh init
  ck2 = Checkpointer(ckpt_dir, save_every=3, keep=2)
  assert ck2.latest_step() == 3
  state, meta = ck2.restore(s2['state'])
  assert meta['data_position'] == 3 and meta['step'] == 3
  assert meta['config']['optim']['lr'] == config.optim.lr
  assert int(state.step) == 3
  state, rest = standin.run_steps(s2, state, meta['data_position'], 3,
                                  checkpointer=ck2, config=config)
  ck2.close()
  resumed = np.concatenate([first, rest])
  print('uninterrupted', uninterrupted, 'resumed', resumed)
  np.testing.assert_array_equal(resumed, uninterrupted)  # bitwise
  assert sorted(os.listdir(ckpt_dir)) == ['3', '6']
  assert not [d for d in os.listdir(ckpt_dir) if 'tmp' in d]
  params = load_params_only(ckpt_dir)
  np.testing.assert_array_equal(
      params['params']['hidden']['kernel'],
      np.asarray(shd.to_host(state.params['hidden']['kernel'])))


def test_restore_into_other_meshes(tmp_path, uninterrupted):
  config = standin.config()
  ckpt_dir = str(tmp_path / 'ckpt')
  s = standin.setup(config, jax.devices())
  ck = Checkpointer(ckpt_dir, save_every=3, keep=None)
  standin.run_steps(s, s['state'], 0, 3, checkpointer=ck)
  ck.close()

  # 8-device data-parallel checkpoint -> 1 device.
  s1 = standin.setup(config, jax.devices()[:1], seed=7)
  state, meta = Checkpointer(ckpt_dir).restore(s1['state'])
  _, rest = standin.run_steps(s1, state, meta['data_position'], 3)
  np.testing.assert_allclose(rest, uninterrupted[3:], rtol=1e-5)

  # -> 4 x 2 mesh with model-sharded parameters and moments.
  c2 = standin.config()
  c2.mesh.model = 2
  s2 = standin.setup(c2, jax.devices(), min_size=256, seed=7)
  state, meta = Checkpointer(ckpt_dir).restore(s2['state'])
  assert state.params['hidden']['kernel'].sharding.spec == jax.sharding.PartitionSpec(None, 'model')
  _, rest = standin.run_steps(s2, state, meta['data_position'], 3)
  np.testing.assert_allclose(rest, uninterrupted[3:], rtol=1e-5)

  # -> fully sharded: parameters and moments split over all 8 devices.
  c3 = standin.config()
  c3.mesh.partition_rules = (('.*', 'fsdp'),)
  s3 = standin.setup(c3, jax.devices(), min_size=256, seed=7)
  state, meta = Checkpointer(ckpt_dir).restore(s3['state'])
  assert state.params['hidden']['kernel'].sharding.spec == \
      jax.sharding.PartitionSpec(None, ('data', 'model'))
  _, rest = standin.run_steps(s3, state, meta['data_position'], 3)
  np.testing.assert_allclose(rest, uninterrupted[3:], rtol=1e-5)


class _Iter:
  """Deterministic-by-step stand-in data; sends SIGTERM to this process
  when asked for batch ``kill_at``."""
  steps_per_epoch = standin.STEPS_PER_EPOCH

  def __init__(self, start, pidx, pcount, kill_at=None):
    self.step, self.pidx, self.pcount, self.kill_at = start, pidx, pcount, kill_at

  def __next__(self):
    if self.step == self.kill_at:
      os.kill(os.getpid(), signal.SIGTERM)
    b = standin.make_batch(self.step, 8, process_index=self.pidx,
                           process_count=self.pcount)
    self.step += 1
    return b

  def set_state(self, s):
    self.step = int(s['step'])


def _train(workdir, evals, kill_at=None):
  config = standin.config(max_steps=6, log_every=1, checkpoint_every=4,
                          keep_checkpoints=2, eval_every=3, init_from='')
  comps = Components(
      init_variables=standin.init_variables, loss_fn=standin.loss_fn,
      make_iterator=lambda s, i, n: _Iter(s, i, n, kill_at),
      evaluate_fn=lambda st: evals.append(int(st.step)) or {'AP': 0.5})
  return train(config, workdir, components=comps)


def test_train_loop_sigterm_and_resume(tmp_path):
  evals = []
  full = _train(str(tmp_path / 'full'), evals)
  assert full['step'] == 6 and not full['stopped'] and full['compiles'] == 1
  assert evals == [3, 6]
  assert sorted(os.listdir(tmp_path / 'full' / 'checkpoints')) == ['4', '6']
  assert os.listdir(tmp_path / 'full' / 'tb')
  assert os.path.isfile(tmp_path / 'full' / 'config.json')

  evals = []
  part = _train(str(tmp_path / 'part'), evals, kill_at=2)
  assert part['stopped'] and part['step'] == 3  # step 3 finished, then saved
  assert sorted(os.listdir(tmp_path / 'part' / 'checkpoints')) == ['3']
  rest = _train(str(tmp_path / 'part'), evals)
  assert rest['step'] == 6 and not rest['stopped']
  assert rest['last_metrics']['loss'] == full['last_metrics']['loss']
  a = load_params_only(str(tmp_path / 'full' / 'checkpoints'))
  b = load_params_only(str(tmp_path / 'part' / 'checkpoints'))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_init_from_pretrained(tiny_config, tiny_state_dict, tiny_variables,
                              tmp_path):
  """init_from: an mmdetection .pth (whole detector) and a torchvision ResNet
  state dict (backbone only) load into a real-model TrainState."""
  shapes = variable_shapes(tiny_config)
  mesh = mesh_lib.make_mesh(tiny_config)
  tx, _ = opt.make_optimizer(tiny_config, 10)
  zeros = lambda rng: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   dict(shapes))
  state, _ = state_lib.init_train_state(zeros, tx, jax.random.PRNGKey(0), mesh)
  n_leaves = len(jax.tree.leaves(dict(shapes)))

  full = loop.load_pretrained(os.path.join(os.path.dirname(__file__), 'data',
                                           'tiny', 'checkpoint.pth'),
                              tiny_config)
  s1, rep = state_lib.merge_variables(state, full, tx)
  assert rep['loaded'] == n_leaves and not rep['missing'] and not rep['unexpected']
  np.testing.assert_array_equal(
      shd.to_host(s1.params['neck']['convs_0']['conv']['kernel']),
      tiny_variables['params']['neck']['convs_0']['conv']['kernel'])

  tv = {k[len('backbone.'):]: v for k, v in tiny_state_dict.items()
        if k.startswith('backbone.')}
  tv['fc.weight'] = np.zeros((10, 4), np.float32)
  assert weight_formats.is_torchvision_resnet(tv)
  assert not weight_formats.is_torchvision_resnet(tiny_state_dict)
  assert weight_formats.is_mmdet_detector(tiny_state_dict)
  bb = weight_formats.torchvision_backbone_variables(tv, tiny_config)
  s2, rep = state_lib.merge_variables(state, bb, tx)
  n_bb = len(jax.tree.leaves(tiny_variables['params']['backbone'])) + len(
      jax.tree.leaves(tiny_variables['batch_stats']['backbone']))
  assert rep['loaded'] == n_bb and not rep['unexpected']
  assert len(rep['missing']) == n_leaves - n_bb
  np.testing.assert_array_equal(
      shd.to_host(s2.params['backbone']['layer2_0']['conv1']['kernel']),
      tiny_variables['params']['backbone']['layer2_0']['conv1']['kernel'])
  np.testing.assert_array_equal(
      shd.to_host(s2.batch_stats['backbone']['bn1']['var']),
      tiny_variables['batch_stats']['backbone']['bn1']['var'])
  assert not np.any(shd.to_host(s2.params['neck']['convs_0']['conv']['kernel']))


def test_flat_moments_are_checkpointed_per_parameter(tmp_path):
  """A state with flat moments writes them per parameter; the checkpoint
  restores into flat and into per-parameter targets alike."""
  config = standin.config()
  s = standin.setup(config, jax.devices()[:1])
  state, _ = standin.run_steps(s, s['state'], 0, 2)
  ck = Checkpointer(str(tmp_path / 'ck'))
  assert ck.save(state, step=2, force=True)
  ck.close()
  arrays = Checkpointer(str(tmp_path / 'ck')).read_meta(2)['arrays']
  assert arrays['opt_state/mu/hidden/kernel'] == [[64, 256], 'float32']
  assert not any(k.startswith('opt_state/mu/default') for k in arrays)
  got, _ = Checkpointer(str(tmp_path / 'ck')).restore(s['state'])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  c2 = standin.config()
  c2.optim.flat_update = False
  s2 = standin.setup(c2, jax.devices()[:1])
  per, _ = Checkpointer(str(tmp_path / 'ck')).restore(s2['state'])
  np.testing.assert_array_equal(
      np.asarray(per.opt_state.nu['hidden']['kernel']),
      np.asarray(state.opt_state.nu.vectors[0][
          _offset(state, 'hidden/kernel'):][:64 * 256]).reshape(64, 256))


def _offset(state, path):
  """Where ``path``'s moments start in its group's flat vector."""
  off = 0
  for _, items in state.opt_state.mu.layout[:1]:
    for p, shape in items:
      if p == path:
        return off
      off += int(np.prod(shape))
  raise KeyError(path)


def test_checkpoint_from_before_stacking_resumes(tmp_path):
  """A checkpoint whose parameters, batch statistics and AdamW moments hold
  identical layers per layer (``encoder/layers_0``, ``backbone/layer1_1``:
  written before layers were stored stacked) restores into today's stacked
  state, sharded, values unchanged; the next save is stacked."""
  rng = np.random.default_rng(0)
  params = {'encoder': {'layers': {'w': rng.normal(size=(3, 4, 8))}},
            'backbone': {'conv1': {'kernel': rng.normal(size=(8, 8))},
                         'layer1_tail': {'k': rng.normal(size=(2, 8, 4))}}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  tx = optax.adamw(1e-3)
  opt_state = tx.update(params, tx.init(params), params)[1]
  state = state_lib.TrainState(
      step=jnp.asarray(5, jnp.int32), params=params,
      batch_stats={'backbone': {'layer1_tail': {'mean': jnp.ones((2, 4))}}},
      opt_state=opt_state, rng=jnp.zeros((2,), jnp.uint32))
  old = checkpoint_layout.map_model_trees(unstack_layers, state)
  assert 'layers_2' in old.params['encoder']
  assert 'layer1_2' in old.opt_state[0].mu['backbone']
  ck = Checkpointer(str(tmp_path / 'ck'), async_save=False)
  assert ck.save(old, step=5, force=True)
  ck.close()

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2),
                           ('data', 'model'))
  shardings = shd.tree_shardings(state, mesh, min_size=1)
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, shardings)
  ck = Checkpointer(str(tmp_path / 'ck'), async_save=False)
  got, meta = ck.restore(target)
  assert meta['step'] == 5
  assert got.params['encoder']['layers']['w'].sharding.spec == \
      jax.sharding.PartitionSpec(None, None, 'model')
  for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(state),
                     jax.tree.leaves(shardings)):
    assert a.sharding == s
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ck.save(got, step=6, force=True)
  assert 'params/encoder/layers/w' in ck.read_meta(6)['arrays']
  ck.close()
  # another state altogether is still refused, naming the arrays
  other = target.replace(params={'encoder': {'layers': {
      'w': jax.ShapeDtypeStruct((3, 4, 9), jnp.float32,
                                sharding=shd.replicated(mesh))}}})
  with pytest.raises(StateMismatchError, match='arrays differ'):
    Checkpointer(str(tmp_path / 'ck')).restore(other, step=5)
