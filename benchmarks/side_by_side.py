"""Our step beside mmdetection 3.3.0's, in alternating rounds on one machine.

Each round runs our benchmark (``python -m ddq_jax benchmark``) and the
reference's (``benchmarks/reference_speed.py``, under a Python that has
torch, mmcv 2.1.0 and mmdet 3.3.0) back to back, one process each, and
records both step medians; odd rounds run ours first, even rounds the
reference first, so drift in the host's load falls on both sides alike.
The speed-up reported is the median over rounds of the per-round ratio
(reference median / ours), beside the ratio of the pooled medians and the
range of the per-round ratios: on a shared host a single pair of runs can
be off by 20% either way.

    python benchmarks/side_by_side.py --ref-python /path/to/mmdet/venv/bin/python \\
        --case tiny_train --case tiny_infer --rounds 3

Cases (ours | reference):
  tiny_train, tiny_infer   the golden fixture's tiny model, batch 2, 128x128
                           | tests/data/tiny/mmdet_config.py
  r50_train                R50 4-scale, batch 1, 800x1344,
                           ``--config.train.memory=auto`` | mmdet's
                           ddq-detr-4scale_r50_8xb2-12e_coco.py (model.loss +
                           backward; ours adds the AdamW update)
  r50_train_published      the same with the config's memory plan
  r50_infer                R50 4-scale inference, batch 1, 800x1344

Prints one JSON line per case (stdout) and, with ``--markdown``, a table
row per case for ``benchmarks/RESULTS.md``.  Progress goes to stderr.
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY_MMDET = os.path.join('tests', 'data', 'tiny', 'mmdet_config.py')
_R50_MMDET = 'ddq-detr-4scale_r50_8xb2-12e_coco.py'

# name: (ours' arguments, reference config (None: mmdet's R50), mode,
#        batch, size, default steps)
CASES = {
    'tiny_train': (['--config', 'tiny'], _TINY_MMDET, 'train', 2,
                   (128, 128), 30),
    'tiny_infer': (['--config', 'tiny'], _TINY_MMDET, 'infer', 2,
                   (128, 128), 30),
    'r50_train': (['--config', 'ddq_r50_4scale',
                   '--config.train.memory=auto'], None, 'train', 1,
                  (800, 1344), 3),
    'r50_train_published': (['--config', 'ddq_r50_4scale'], None, 'train',
                            1, (800, 1344), 3),
    'r50_infer': (['--config', 'ddq_r50_4scale'], None, 'infer', 1,
                  (800, 1344), 5),
}


def _mmdet_config(ref_python: str, name: str) -> str:
  """The path of one of mmdet's published DDQ configs, as installed beside
  the reference Python."""
  code = ('import mmdet, os; print(os.path.join(os.path.dirname('
          f"mmdet.__file__), '.mim', 'configs', 'ddq', {name!r}))")
  path = subprocess.run([ref_python, '-c', code], check=True,
                        capture_output=True, text=True).stdout.strip()
  if not os.path.exists(path):
    raise SystemExit(f'side_by_side: {name} not found beside {ref_python} '
                     f'(looked at {path})')
  return path


def _last_json(text: str, what: str) -> dict:
  for line in reversed(text.strip().splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  raise RuntimeError(f'{what} printed no JSON line; its output ends:\n'
                     + text[-2000:])


def _run(cmd, what: str) -> dict:
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'{what} failed (exit {proc.returncode}): '
                       f'{" ".join(cmd)}\n{proc.stderr[-3000:]}')
  out = _last_json(proc.stdout, what)
  out['wall_s'] = round(time.perf_counter() - t0, 1)
  return out


def run_case(name: str, *, ref_python: str, rounds: int,
             steps: int | None, ours_python: str) -> dict:
  ours_args, ref_config, mode, batch, size, default_steps = CASES[name]
  steps = default_steps if steps is None else steps
  if ref_config is None:
    ref_config = _mmdet_config(ref_python, _R50_MMDET)
  common = ['--mode', mode, '--batch', str(batch), '--size',
            str(size[0]), str(size[1]), '--steps', str(steps)]
  ours_cmd = ([ours_python, '-m', 'ddq_jax', 'benchmark'] + ours_args
              + common + ['--no-profile'])
  ref_cmd = [ref_python, os.path.join('benchmarks', 'reference_speed.py'),
             ref_config] + common
  ours, ref = [], []
  for r in range(rounds):
    order = (('ours', ours_cmd, ours), ('reference', ref_cmd, ref))
    for who, cmd, sink in (order if r % 2 == 0 else order[::-1]):
      print(f'[{name}] round {r + 1}/{rounds}: {who} '
            f'(load {os.getloadavg()[0]:.2f})', file=sys.stderr, flush=True)
      sink.append(_run(cmd, f'{name} {who}'))
  ours_med = [o['step_median_s'] for o in ours]
  ref_med = [o['step_median_s'] for o in ref]
  ratios = [b / a for a, b in zip(ours_med, ref_med)]
  return dict(
      case=name, mode=mode, batch=batch, size=list(size), steps=steps,
      rounds=rounds, ours_step_median_s=ours_med,
      reference_step_median_s=ref_med,
      speedup_per_round=[round(x, 3) for x in ratios],
      speedup_median=round(float(np.median(ratios)), 3),
      speedup_pooled=round(float(np.median(ref_med) / np.median(ours_med)),
                           3),
      speedup_range=[round(min(ratios), 3), round(max(ratios), 3)],
      load_avg_1m=[o.get('load_avg_1m') for o in ours + ref],
      ours_peak_host_rss_gb=max(o.get('peak_host_rss_gb', 0) for o in ours),
      reference_peak_host_rss_gb=max(o.get('peak_host_rss_gb', 0)
                                     for o in ref))


def markdown_row(res: dict) -> str:
  ours = float(np.median(res['ours_step_median_s']))
  ref = float(np.median(res['reference_step_median_s']))
  lo, hi = res['speedup_range']
  return (f"| {res['case']} | {res['rounds']} x {res['steps']} | "
          f'{ours:.4g} s | {ref:.4g} s | **{res["speedup_median"]:.2f}x** | '
          f'{lo:.2f}-{hi:.2f}x |')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--ref-python', default=os.environ.get('DDQ_REF_PYTHON'),
                 help='a Python with torch, mmcv 2.1.0 and mmdet 3.3.0 '
                 '(default: $DDQ_REF_PYTHON)')
  p.add_argument('--case', action='append', choices=sorted(CASES),
                 help='repeatable (default: tiny_train and tiny_infer)')
  p.add_argument('--rounds', type=int, default=3,
                 help='alternating rounds per case (default 3)')
  p.add_argument('--steps', type=int, default=None,
                 help="timed steps per run (default: the case's)")
  p.add_argument('--ours-python', default=sys.executable,
                 help='the Python with ddq_jax installed (default: this one)')
  p.add_argument('--markdown', action='store_true',
                 help='also print a RESULTS.md table row per case')
  a = p.parse_args(argv)
  if not a.ref_python:
    p.error('--ref-python (or $DDQ_REF_PYTHON) is required: the reference '
            'runs in its own environment')
  if not os.path.exists(a.ref_python):
    p.error(f'--ref-python {a.ref_python}: no such file')
  if a.rounds < 1:
    p.error('--rounds must be at least 1')
  rows = []
  for name in a.case or ['tiny_train', 'tiny_infer']:
    res = run_case(name, ref_python=a.ref_python, rounds=a.rounds,
                   steps=a.steps, ours_python=a.ours_python)
    print(json.dumps(res), flush=True)
    rows.append(markdown_row(res))
  if a.markdown:
    print('| case | rounds x steps | ddq-jax | reference | speed-up '
          '(median of rounds) | range |')
    print('|---|---|---|---|---|---|')
    print('\n'.join(rows))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
