"""Per-chip figures of the training step are flat across pod sizes: the
tiny config compiled for TPU v5e at 4, 16 and 64 chips, 2 images per chip
(``benchmarks/pod_collectives.py``, deviceless; slow, skipped without
libtpu).  Each chip computes its own images' loss, so the collectives are
the gradient all-reduce (the trainable parameters' bytes) and scalars, with
no all-gather of a per-image tensor, whatever the chip count."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'pod_collectives.py')
SCALAR_BYTES = 64 * 1024   # normalisers, loss terms, metrics


def _have(module):
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not _have('libtpu'),
                    reason="libtpu missing (pip install 'ddq-jax[tpu]')")
def test_per_chip_collectives_flat_4_16_64_chips(tmp_path):
  out = tmp_path / 'pod.json'
  run = subprocess.run(
      [sys.executable, SCRIPT, '--config', 'tiny', '--topologies',
       'v5e:2x2,v5e:4x4,v5e:8x8', '--batch-per-chip', '2', '--size', '128',
       '128', '--json', str(out)],
      capture_output=True, text=True, timeout=7200, check=False,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert run.returncode == 0, run.stderr[-3000:]
  print(run.stdout)
  res = json.loads(out.read_text())
  rows, params = res['rows'], res['trainable_param_bytes']
  assert [r['chips'] for r in rows] == [4, 16, 64]
  for r in rows:
    coll = r['collectives']
    assert r['collective_bytes'] <= 1.05 * params + SCALAR_BYTES, r
    assert coll.get('all-gather', {'bytes': 0})['bytes'] <= SCALAR_BYTES, r
    assert set(coll) <= {'all-reduce', 'all-gather'}, coll
  base = rows[0]
  for r in rows[1:]:
    assert abs(r['collective_bytes'] - base['collective_bytes']) <= \
        SCALAR_BYTES, (base, r)
    assert r['peak_memory_gb'] <= 1.05 * base['peak_memory_gb'], (base, r)
