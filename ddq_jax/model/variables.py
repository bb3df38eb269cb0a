"""Creating the model's variables: every parameter of every branch.

Inference alone never touches the denoising label embedding or the dense
auxiliary branches, so variables are created with a training forward on a
dummy batch.  ``variable_shapes`` does the same abstractly (no compute).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ddq_jax.model.detector import DDQDETR, build_model


def _dummy_batch(config, image_size: int):
  b, g = 1, 2
  size = image_size
  return dict(
      images=jnp.zeros((b, size, size, 3), jnp.float32),
      pad_mask=jnp.zeros((b, size, size), bool),
      img_shapes=jnp.full((b, 2), size, jnp.int32),
      gt_boxes=jnp.tile(jnp.array([[[4., 4., size / 2, size / 2]]]), (b, g, 1)),
      gt_labels=jnp.zeros((b, g), jnp.int32),
      gt_valid=jnp.ones((b, g), bool))


def default_image_size(config) -> int:
  """A canvas big enough for every level and for the dense queries."""
  size = 64 * 2 ** max(0, config.num_levels - 4)
  dense = int(config.num_queries * config.dense_topk_ratio)
  while sum((size // s) ** 2 for s in (8, 16, 32, 64, 128)[:config.num_levels]) < dense:
    size *= 2
  return size


def init_variables(model: DDQDETR, config, rng: jax.Array,
                   *, image_size: int | None = None) -> dict:
  """{'params', 'batch_stats'} with every branch initialised."""
  batch = _dummy_batch(config, image_size or default_image_size(config))
  init_rng, dn_rng = jax.random.split(rng)
  return model.init(init_rng, batch['images'], batch['pad_mask'],
                    img_shapes=batch['img_shapes'], train=True,
                    gt_boxes=batch['gt_boxes'], gt_labels=batch['gt_labels'],
                    gt_valid=batch['gt_valid'], dn_rng=dn_rng)


def variable_shapes(config) -> dict:
  """The shapes of ``init_variables`` (a tree of ShapeDtypeStruct)."""
  model = build_model(config)
  return jax.eval_shape(
      lambda: init_variables(model, config, jax.random.key(0)))
