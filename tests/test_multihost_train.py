"""train.py with the real tiny DDQ model and the synthetic data, as two JAX
processes (2 fake CPU devices each, gloo collectives on 127.0.0.1) and as
one process with 4 devices: the same losses, each process reading only its
own images, and checkpoints that resume across the two layouts.

Tolerance: each device computes the same images with the same program in
both layouts (the per-device loss, ``train.objective``), but the gradient
and normaliser all-reduces sum the 4 devices in another order (XLA:CPU's
in-process reduction against gloo's), so values may differ in the last
float32 bits.  Losses are compared within 1e-5 (relative); the gradient
norm within 1e-3, because the bilinear sampling's gradient is
discontinuous at pixel boundaries and the parameters after two updates
differ in the last bits.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from ddq_jax.config import load_config
from ddq_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'tiny_synthetic.py')
STEPS = 3
GLOBAL_BATCH = 4
OVERRIDES = (f'--config.train.max_steps={STEPS}', '--config.train.log_every=1',
             '--config.train.eval_every=0',
             '--config.train.checkpoint_every=2',
             '--config.train.keep_checkpoints=0',
             f'--config.train.global_batch_size={GLOBAL_BATCH}')
TIMEOUT_S = 1500  # two processes compiling on a 2-core machine
LOSS_RTOL, GRAD_NORM_RTOL = 1e-5, 1e-3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _train(workdir: str, nproc: int, devices_per_process: int) -> None:
  """Runs ``python -m ddq_jax train`` as ``nproc`` processes."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count='
             f'{devices_per_process}')
  cmd = [sys.executable, '-m', 'ddq_jax', 'train', '--config', CONFIG,
         '--workdir', workdir, *OVERRIDES]
  if nproc > 1:
    cmd += [f'--coordinator_address=127.0.0.1:{_free_port()}',
            f'--num_processes={nproc}', '--cpu_collectives=gloo']
  procs = [subprocess.Popen(
      cmd + ([f'--process_id={i}'] if nproc > 1 else []), env=env, cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(nproc)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]


def _metrics(workdir: str) -> dict[int, dict]:
  """{step: the last record logged for that step}."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if 'train/loss' in r}


def _compare(got: dict, want: dict, steps) -> None:
  for step in steps:
    for key, value in want[step].items():
      if not key.startswith('train/') or key.endswith('images_per_s'):
        continue
      rtol = GRAD_NORM_RTOL if key == 'train/grad_norm' else LOSS_RTOL
      np.testing.assert_allclose(got[step][key], value, rtol=rtol,
                                 atol=1e-7, err_msg=f'step {step} {key}')


def _resume_copy(src: str, dst: str) -> None:
  """``src`` as it was after step 2: the checkpoint of step 3 removed."""
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, 'checkpoints', str(STEPS)))
  os.remove(os.path.join(dst, 'train.lock'))


def test_each_process_reads_only_its_images():
  """The iterator train.py builds: two processes' batches are the two
  halves of the one-process global batch, at every step."""
  config = load_config(CONFIG)
  config.train.global_batch_size = GLOBAL_BATCH
  comps = loop.default_components(config)
  one = comps.make_iterator(0, 0, 1)
  halves = [comps.make_iterator(0, p, 2) for p in range(2)]
  try:
    for _ in range(STEPS):
      whole = next(one)
      parts = [next(h) for h in halves]
      assert [len(p['image_ids']) for p in parts] == [GLOBAL_BATCH // 2] * 2
      np.testing.assert_array_equal(
          np.concatenate([p['image_ids'] for p in parts]), whole['image_ids'])
      np.testing.assert_array_equal(
          np.concatenate([p['images'] for p in parts]), whole['images'])
  finally:
    for it in [one, *halves]:
      if hasattr(it, 'close'):
        it.close()


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  _train(one, nproc=1, devices_per_process=4)
  _train(two, nproc=2, devices_per_process=2)
  ref = _metrics(one)
  assert sorted(ref) == list(range(1, STEPS + 1))
  _compare(_metrics(two), ref, range(1, STEPS + 1))
  assert os.path.isfile(os.path.join(two, 'train.1.log'))

  # A checkpoint written by two processes resumes in one, and the other
  # way round: step 3 from step 2's checkpoint.
  two_to_one, one_to_two = str(tmp_path / '2to1'), str(tmp_path / '1to2')
  _resume_copy(two, two_to_one)
  _resume_copy(one, one_to_two)
  _train(two_to_one, nproc=1, devices_per_process=4)
  _train(one_to_two, nproc=2, devices_per_process=2)
  _compare(_metrics(two_to_one), ref, [STEPS])
  _compare(_metrics(one_to_two), ref, [STEPS])
