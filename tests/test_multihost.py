"""Two real JAX processes on 127.0.0.1 (gloo CPU collectives, 2 fake devices
each) train like one process with 4 devices, and their checkpoints resume
across process counts in both directions."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import standin  # noqa: E402

from ddq_jax.train.checkpoint import Checkpointer

WORKER = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # the shared 2-core CI machine is slow; typically ~40 s
RTOL = 1e-5


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(nproc, out_dir, resume_dir):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  procs = [subprocess.Popen(
      [sys.executable, WORKER, str(i), str(nproc), str(port), out_dir,
       resume_dir], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(nproc)]
  deadline = time.time() + TIMEOUT_S
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=max(deadline - time.time(), 1))
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  with open(os.path.join(out_dir, 'losses.json')) as f:
    return json.load(f)


def test_two_processes_match_one(tmp_path):
  # 1 process, 4 devices: reference losses and a checkpoint at steps 2, 4.
  one_dir = str(tmp_path / 'one')
  s = standin.setup(standin.config(), jax.devices()[:4])
  ck = Checkpointer(one_dir, save_every=2, keep=None)
  _, ref = standin.run_steps(s, s['state'], 0, 4, checkpointer=ck)
  ck.close()

  t = time.time()
  two = _launch(2, str(tmp_path / 'two'), one_dir)
  print(f'2-process run: {time.time() - t:.1f} s; ref {ref}; '
        f'2-proc {two["fresh"]}; resumed from 1-proc ckpt {two["resumed"]}')
  assert two['compiles'] == 1
  np.testing.assert_allclose(two['fresh'], ref, rtol=RTOL)
  # 1-process checkpoint -> 2 processes.
  np.testing.assert_allclose(two['resumed'], ref[2:], rtol=RTOL)

  # 2-process checkpoint -> 1 process (on 4 and on 8 devices).
  for devices in (jax.devices()[:4], jax.devices()):
    s1 = standin.setup(standin.config(), devices, seed=5)
    state, meta = Checkpointer(str(tmp_path / 'two' / 'ckpt')).restore(
        s1['state'], step=2)
    assert meta['process_count'] == 2 and meta['data_position'] == 2
    _, resumed = standin.run_steps(s1, state, 2, 2)
    np.testing.assert_allclose(resumed, ref[2:], rtol=RTOL)
