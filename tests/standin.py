"""A small stand-in detector + loss + deterministic data for the training
infrastructure tests (independent of the real model).

It has the features the infrastructure must handle: a 'backbone' subtree
with a frozen stem / stage 1 and frozen BN (params + 'batch_stats'), a
trainable rest, an rng-dependent loss (dropout), the real batch format and
padded ground truth with validity masks.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddq_jax.config import complete_config
from ddq_jax.train import optimizer as opt
from ddq_jax.train import state as state_lib
from ddq_jax.train import step as step_lib
from ddq_jax.train.parallel import mesh as mesh_lib
from ddq_jax.train.parallel import sharding as shd

H = W = 16
G = 3
NUM_CLASSES = 5


class BN(nn.Module):
  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = jax.lax.stop_gradient(self.param('scale', nn.initializers.ones, (c,)))
    bias = jax.lax.stop_gradient(self.param('bias', nn.initializers.zeros, (c,)))
    mean = self.variable('batch_stats', 'mean',
                         lambda: jnp.full((c,), 0.1, jnp.float32)).value
    var = self.variable('batch_stats', 'var',
                        lambda: jnp.full((c,), 0.9, jnp.float32)).value
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3, 3), (2, 2), use_bias=False, name='conv1')(x)
    return nn.relu(BN(name='bn1')(x))


class Backbone(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(BN(name='bn1')(nn.Conv(8, (3, 3), (2, 2), use_bias=False,
                                       name='conv1')(x)))
    x = nn.relu(nn.Conv(8, (3, 3), name='layer1_0')(x))
    x = jax.lax.stop_gradient(x)  # frozen_stages = 1
    return Block(name='layer2_0')(x)


class StandInDetector(nn.Module):
  @nn.compact
  def __call__(self, images, pad_mask, *, dropout_rng=None):
    f = Backbone(name='backbone')(images)
    f = nn.Dense(64, name='neck')(f)
    valid = ~pad_mask[:, ::4, ::4, None]
    f = (f * valid).sum((1, 2)) / jnp.maximum(valid.sum((1, 2)), 1)
    if dropout_rng is not None:
      keep = jax.random.bernoulli(dropout_rng, 0.9, f.shape)
      f = jnp.where(keep, f / 0.9, 0)
    f = nn.relu(nn.Dense(256, name='hidden')(f))
    boxes = nn.sigmoid(nn.Dense(4 * G, name='reg')(f)).reshape(-1, G, 4)
    logits = nn.Dense(NUM_CLASSES, name='cls')(f)
    return boxes, logits


MODEL = StandInDetector()


def _init_numpy():
  """Deterministic numpy init (a jitted flax init compiles slowly on the
  shared 2-core test machine)."""
  abstract = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, H, W, 3)), jnp.zeros((1, H, W), bool))
  r = np.random.default_rng(0)

  def make(path, a):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'kernel':
      fan_in = int(np.prod(a.shape[:-1]))
      return (r.normal(size=a.shape) / np.sqrt(fan_in)).astype(np.float32)
    if name in ('scale', 'var'):
      return (1 + 0.1 * r.uniform(size=a.shape)).astype(np.float32)
    return (0.1 * r.normal(size=a.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(make, abstract)


_VARIABLES = _init_numpy()


def init_variables(rng):
  del rng
  return jax.tree.map(jnp.asarray, _VARIABLES)


def loss_fn(params, batch_stats, batch, rng):
  boxes, logits = MODEL.apply({'params': params, 'batch_stats': batch_stats},
                              batch['images'], batch['pad_mask'],
                              dropout_rng=rng)
  hw = batch['img_shapes'].astype(jnp.float32)
  norm = jnp.concatenate([hw[:, ::-1], hw[:, ::-1]], -1)[:, None]
  gt = batch['gt_boxes'] / norm
  valid = batch['gt_valid'].astype(jnp.float32)
  sv = batch['sample_valid'].astype(jnp.float32)
  l1 = (jnp.abs(boxes.astype(jnp.float32) - gt).sum(-1) * valid).sum(-1)
  l1 = l1 / jnp.maximum(valid.sum(-1), 1)
  onehot = (jax.nn.one_hot(batch['gt_labels'], NUM_CLASSES) * valid[..., None]
            ).max(1)
  lg = logits.astype(jnp.float32)
  bce = (jnp.maximum(lg, 0) - lg * onehot + jnp.log1p(jnp.exp(-jnp.abs(lg)))
         ).mean(-1)
  n = jnp.maximum(sv.sum(), 1)
  loss_bbox = (l1 * sv).sum() / n
  loss_cls = (bce * sv).sum() / n
  return loss_bbox + loss_cls, {'loss_bbox': loss_bbox, 'loss_cls': loss_cls}


def make_batch(step, global_batch, *, seed=0, process_index=0,
               process_count=1):
  """The rows of global batch ``step`` that belong to ``process_index``."""
  r = np.random.default_rng([seed, step])
  b = global_batch
  images = r.normal(size=(b, H, W, 3)).astype(np.float32)
  hs = r.integers(8, H + 1, size=b)
  ws = r.integers(8, W + 1, size=b)
  pad = np.ones((b, H, W), bool)
  for i in range(b):
    pad[i, :hs[i], :ws[i]] = False
  xy = r.uniform(0, 6, size=(b, G, 2))
  wh = r.uniform(1, 6, size=(b, G, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  gt_valid = r.uniform(size=(b, G)) < 0.7
  sample_valid = np.ones(b, bool)
  sample_valid[-1] = step % 2 == 0  # a padded sample now and then
  batch = dict(images=images * ~pad[..., None], pad_mask=pad,
               img_shapes=np.stack([hs, ws], -1).astype(np.int32),
               scale_factors=np.ones((b, 2), np.float32),
               gt_boxes=boxes * gt_valid[..., None],
               gt_labels=r.integers(0, NUM_CLASSES, size=(b, G)).astype(np.int32),
               gt_valid=gt_valid, image_ids=np.arange(b) + step * b,
               sample_valid=sample_valid)
  n = b // process_count
  return {k: v[process_index * n:(process_index + 1) * n]
          for k, v in batch.items()}


def config(**train):
  """The defaults with the stand-in's optimiser and loop settings."""
  return complete_config(dict(
      backbone=dict(frozen_stages=1),
      optim=dict(lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1,
                 clip_norm=0.1, warmup_steps=4, warmup_factor=0.1, epochs=2,
                 decay_epochs=(1,), decay_factor=0.1),
      train=dict(dict(global_batch_size=8, seed=0, checkpoint_every=3,
                      keep_checkpoints=2, compute_dtype='float32'), **train),
      mesh=dict(data=-1, model=1)))


STEPS_PER_EPOCH = 4


def setup(config, devices=None, *, min_size=None, seed=0):
  """mesh, tx, fresh state, its shardings and the jitted step."""
  mesh = mesh_lib.make_mesh(config, devices)
  tx, _ = opt.make_optimizer(config, STEPS_PER_EPOCH)
  state, shardings = state_lib.init_train_state(
      init_variables, tx, jax.random.PRNGKey(seed), mesh,
      min_size=shd.MIN_SHARD_SIZE if min_size is None else min_size,
      rules=shd.rules_from_config(config)[0])
  step = step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, tx,
                               compute_dtype=config.train.compute_dtype),
      mesh, shardings)
  return dict(mesh=mesh, tx=tx, state=state, shardings=shardings, step=step)


def run_steps(setup_, state, start, n, *, global_batch=8, checkpointer=None,
              config=None):
  """Runs steps start..start+n-1 (feeding this process's rows); returns
  (state, losses)."""
  losses = []
  for i in range(start, start + n):
    local = make_batch(i, global_batch, process_index=jax.process_index(),
                       process_count=jax.process_count())
    state, m = setup_['step'](state, shd.shard_batch(local, setup_['mesh']))
    losses.append(float(shd.to_host(m)['loss']))
    if checkpointer is not None:
      checkpointer.save(state, config=config)
  return state, np.array(losses)
