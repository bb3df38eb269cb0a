"""Per-chip bytes of the training state, replicated against fully sharded.

    python benchmarks/fsdp_bytes.py [--config ddq_swinl_4scale] \\
        [--chips 8 64 256] [--batch-per-chip 2] [--size 800 1344]

For each chip count (one 'data' axis over all chips, as on a v5e / v6e
pod slice) it prints a JSON line with the bytes each chip holds between
steps: the parameters, batch statistics and AdamW moments of the
TrainState, and its share of the batch.  These are the step's argument
bytes (what ``compiled.memory_analysis().argument_size_in_bytes`` reports
for the training step), computed exactly from the same abstract state
and ``state_shardings`` that training uses, under the default rules
(``largest_axis``: replicated while ``mesh.model`` is 1) and under
``mesh.partition_rules=(('.*', 'fsdp'),)``.  Nothing is materialised and
no device is needed: the mesh is an ``AbstractMesh``, so 256 chips cost
nothing; the figures are the same for any chip type.
"""
from __future__ import annotations

import argparse
import json

import jax
from jax.sharding import AbstractMesh
import numpy as np

from ddq_jax.config import load_config
from ddq_jax.model.variables import variable_shapes
from ddq_jax.tools.accelerators.deviceless import abstract_batch
from ddq_jax.train import state as state_lib
from ddq_jax.train.optimizer import make_optimizer
from ddq_jax.train.parallel.mesh import DATA, MODEL

GB = 2.0 ** 30


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ``ShapeDtypeStruct``s."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) *
             np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(config, chips: int, batch_per_chip: int, size) -> dict:
  """{'state', 'batch', 'parameters', 'moments'} bytes per chip."""
  mesh = AbstractMesh((chips, 1), (DATA, MODEL))
  tx, _ = make_optimizer(config, steps_per_epoch=1000)
  abstract = jax.eval_shape(lambda v: state_lib.create_train_state(
      v, tx, jax.random.PRNGKey(0)), variable_shapes(config))
  shardings = state_lib.state_shardings(abstract, mesh, config)
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  batch = abstract_batch(config, 'train', batch_per_chip * chips, size, mesh)
  return dict(state=per_chip_bytes(state), batch=per_chip_bytes(batch),
              parameters=per_chip_bytes(state.params),
              moments=per_chip_bytes(state.opt_state))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='ddq_swinl_4scale')
  p.add_argument('--chips', type=int, nargs='+', default=(8, 64, 256))
  p.add_argument('--batch-per-chip', type=int, default=2)
  p.add_argument('--size', type=int, nargs=2, default=(800, 1344))
  args = p.parse_args(argv)
  for chips in args.chips:
    row = dict(config=args.config, chips=chips,
               batch_per_chip=args.batch_per_chip, size=list(args.size))
    for rules in ('largest_axis', 'fsdp'):
      config = load_config(args.config)
      config.mesh.partition_rules = (('.*', rules),)
      got = state_bytes(config, chips, args.batch_per_chip, args.size)
      row[rules] = {k: round(v / GB, 4) for k, v in got.items()}
      row[rules]['arguments_gb'] = round((got['state'] + got['batch']) / GB,
                                         4)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
