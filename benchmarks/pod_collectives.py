"""Per-chip collectives and peak memory of the training step across pod
sizes: deviceless TPU compiles (``ddq_jax/tools/accelerators``).

    python benchmarks/pod_collectives.py                       # tiny, 4/16/64 chips
    python benchmarks/pod_collectives.py --loss both --json out.json
    python benchmarks/pod_collectives.py --config ddq_r50_4scale \\
        --topologies v5e:2x4,v5e:8x8 --size 800 1344

Needs libtpu (``pip install 'ddq-jax[tpu]'``).  Each row is one compile of
the real train step with ``--batch-per-chip`` images per chip:

* ``per-device`` (what training runs, ``make_loss_fn(mesh=...)``): every
  chip computes the forward, matching, denoising and loss of its own
  images; the collectives are the gradient all-reduce and the scalar
  normalisers / metrics;
* ``global``: the loss over the whole batch under jit's automatic
  partitioning (the port before the per-device loss): the predictions and
  ground truth of every image reach every chip for the matching.

Prints a table (per-chip peak GB, each collective kind's count and MB,
their total over the trainable parameters' bytes) and, with --json, the
rows.  Collectives are counted in the optimised HLO (an instruction in a
``while`` body counts once; ``hlo_stats.py``).
"""
import argparse
import json
import sys

import jax
import numpy as np

from ddq_jax.config import load_config
from ddq_jax.model.variables import variable_shapes
from ddq_jax.tools.accelerators.deviceless import compile_for_target
from ddq_jax.tools.accelerators.targets import parse_target
from ddq_jax.train.optimizer import param_labels

MB = 2.0 ** 20
KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
         'collective-permute')


def trainable_bytes(config) -> int:
  """Bytes of the parameters the optimiser updates (float32)."""
  params = variable_shapes(config)['params']
  labels = param_labels(params, config)
  return int(sum(np.prod(p.shape) * np.dtype(p.dtype).itemsize
                 for p, l in zip(jax.tree.leaves(params),
                                 jax.tree.leaves(labels)) if l != 'frozen'))


def measure(config, topology: str, *, per_device_loss: bool, size,
            batch_per_chip: int) -> dict:
  """One compile's row: chips, peak, collectives, their bytes."""
  res = compile_for_target(config, parse_target(f'tpu:{topology}'),
                           mode='train', size=size,
                           batch_per_chip=batch_per_chip,
                           per_device_loss=per_device_loss)
  coll = res['collectives']
  return dict(loss='per-device' if per_device_loss else 'global',
              topology=topology, chips=res['devices'], batch=res['batch'],
              peak_memory_gb=res['peak_memory_gb'],
              temp_memory_gb=res['temp_memory_gb'], collectives=coll,
              collective_bytes=int(sum(c['bytes'] for c in coll.values())),
              compile_s=res['compile_s'])


def table(rows, param_bytes: int) -> str:
  head = (f"{'loss':<11}{'chips':>6}{'peak GB':>9}" +
          ''.join(f'{k:>24}' for k in KINDS[:3]) +
          f"{'total MB':>10}{'/params':>9}")
  lines = [f'trainable parameters: {param_bytes / MB:.2f} MB (float32)', head]
  for r in rows:
    cells = []
    for k in KINDS[:3]:
      c = r['collectives'].get(k, {'count': 0, 'bytes': 0})
      cells.append(f"{c['count']:>6} x {c['bytes'] / MB:>10.4f} MB")
    lines.append(f"{r['loss']:<11}{r['chips']:>6}{r['peak_memory_gb']:>9.4f}"
                 + ''.join(f'{c:>24}' for c in cells) +
                 f"{r['collective_bytes'] / MB:>10.3f}"
                 f"{r['collective_bytes'] / param_bytes:>9.4f}")
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='tiny')
  p.add_argument('--topologies', default='v5e:2x2,v5e:4x4,v5e:8x8',
                 help='libtpu topology names (4, 16 and 64 chips)')
  p.add_argument('--size', type=int, nargs=2, default=(128, 128))
  p.add_argument('--batch-per-chip', type=int, default=2)
  p.add_argument('--loss', choices=('per-device', 'global', 'both'),
                 default='per-device')
  p.add_argument('--solver', default='jax',
                 help="loss.hungarian_solver ('jax': no host round trip)")
  p.add_argument('--json', help='also write the rows here')
  a = p.parse_args(argv)
  config = load_config(a.config, {'loss.hungarian_solver': a.solver})
  modes = {'per-device': (True,), 'global': (False,),
           'both': (False, True)}[a.loss]
  rows = []
  for per_device in modes:
    for topology in a.topologies.split(','):
      rows.append(measure(config, topology, per_device_loss=per_device,
                          size=tuple(a.size), batch_per_chip=a.batch_per_chip))
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  param_bytes = trainable_bytes(config)
  print(table(rows, param_bytes))
  if a.json:
    with open(a.json, 'w', encoding='utf-8') as f:
      json.dump(dict(config=a.config, size=list(a.size),
                     batch_per_chip=a.batch_per_chip,
                     trainable_param_bytes=param_bytes, rows=rows), f,
                indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
