"""Fault injection on the training loop (stand-in model, CPU): NaN at a
chosen step, damaged checkpoints, a checkpoint path that is a file, a resume
with another config, SIGTERM, and kill -9 at random moments around saves.

Default run: the in-process cases.  ``-m slow``: the other damage modes and
the kill -9 trials (subprocesses of tests/fault_driver.py).
"""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fault_driver  # noqa: E402
import standin  # noqa: E402
import jax.numpy as jnp

from ddq_jax.train import checkpoint as ckpt_lib, integrity
from ddq_jax.train import loop
from ddq_jax.train import nonfinite
from ddq_jax.losses.hungarian import hungarian_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, 'tests', 'fault_driver.py')


def _train(workdir, **train):
  return loop.train(fault_driver.make_config(**train), str(workdir),
                    components=fault_driver.components())


def losses_by_step(workdir) -> dict:
  """step -> loss, the last record of each step in metrics.jsonl (a resumed
  run re-records the steps after its checkpoint)."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'train/loss' in r:
        out[r['step']] = r['train/loss']
  return out


def _ckpt_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 8-step run: {step: loss}."""
  wd = tmp_path_factory.mktemp('reference')
  _train(wd, max_steps=8, keep_checkpoints=3)
  return losses_by_step(wd)


# ---------------------------------------------------------------- NaN
def test_nan_step_is_skipped_and_a_streak_stops(tmp_path, reference):
  one = _train(tmp_path / 'one', max_steps=8, inject_nan_at_steps=(4,))
  assert one['nonfinite_steps'] == 1 and one['step'] == 8
  got = losses_by_step(tmp_path / 'one')
  assert not np.isfinite(got[5])  # step index 4 is the 5th step
  for s in (1, 2, 3, 4):  # before: the same run
    assert got[s] == reference[s]
  # the skipped step left params / optimiser state untouched: the run goes
  # on finite (its later losses differ from the reference only by the
  # missing update)
  assert all(np.isfinite(got[s]) for s in (6, 7, 8))

  with pytest.raises(nonfinite.NonFiniteError, match='3 non-finite steps in '
                     'a row.*steps 4..6'):
    _train(tmp_path / 'streak', max_steps=12, inject_nan_at_steps=(3, 4, 5, 6))
  assert loop.exit_code_for(nonfinite.NonFiniteError('x')) == loop.EXIT_NONFINITE
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'streak' / 'checkpoints'))
  assert ck.all_steps() == [2, 4]  # no save after the stop
  s = standin.setup(standin.config(), jax.devices())
  _, meta = ck.restore_latest_good(s['state'])  # finite, checksums hold
  assert meta['step'] == 4


def test_nonfinite_state_is_never_saved(tmp_path):
  s = standin.setup(standin.config(), jax.devices())
  bad = s['state'].replace(params=jax.tree.map(
      lambda x: x * np.nan, s['state'].params))
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'ck'))
  assert not ck.save(bad, step=5, force=True)
  ck.close()
  assert ck.all_steps() == []


# ---------------------------------------------------------- damaged ckpt
def _damage(step_dir: str, mode: str) -> None:
  files = sorted(glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0',
                                        'd', '*')), key=os.path.getsize)
  big = files[-1]
  if mode == 'flip':  # bytes at 8 places of the largest array file
    # (a data file also holds the per-process b-tree node, which restoring
    # does not read once the process databases are merged: one flipped
    # place alone may land there and harm nothing)
    b = bytearray(open(big, 'rb').read())
    for k in range(8):
      at = len(b) * k // 8
      for i in range(at, min(at + 16, len(b))):
        b[i] ^= 0xFF
    open(big, 'wb').write(bytes(b))
  elif mode == 'truncate':
    b = open(big, 'rb').read()
    open(big, 'wb').write(b[:len(b) // 2])
  elif mode == 'no_array_metadata':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  elif mode == 'no_meta':
    shutil.rmtree(os.path.join(step_dir, 'meta'))
  elif mode == 'no_array_file':
    os.remove(big)
  elif mode == 'checksum_edited':  # arrays fine, recorded checksum not
    path = os.path.join(step_dir, 'meta', 'metadata')
    meta = json.load(open(path))
    k = sorted(meta['checksums'])[0]
    meta['checksums'][k] = (meta['checksums'][k] + 1) % 2 ** 32
    json.dump(meta, open(path, 'w'))
  elif mode == 'emptied':
    for f in glob.glob(os.path.join(step_dir, '**'), recursive=True):
      if os.path.isfile(f):
        open(f, 'w').close()
  else:
    raise ValueError(mode)


def _resume_after_damage(tmp_path, reference, mode, caplog):
  wd = tmp_path / mode
  _train(wd, max_steps=6, keep_checkpoints=3)
  assert _ckpt_steps(wd) == [2, 4, 6]
  _damage(str(wd / 'checkpoints' / '6'), mode)
  with caplog.at_level('ERROR', logger='ddq_jax'):
    out = _train(wd, max_steps=8, keep_checkpoints=3)
  assert out['step'] == 8
  assert 'checkpoint step 6' in caplog.text, caplog.text
  damaged = os.listdir(str(wd / 'checkpoints') + '.damaged')
  assert len(damaged) == 1 and damaged[0].startswith('6-')  # kept, aside
  got = losses_by_step(wd)
  for s in range(1, 9):  # 5, 6 redone from step 4, then 7, 8
    assert got[s] == reference[s], (s, got[s], reference[s])
  assert _ckpt_steps(wd) == [4, 6, 8]


@pytest.mark.parametrize('mode', ['flip'])
def test_damaged_newest_checkpoint_fast(tmp_path, reference, mode, caplog):
  _resume_after_damage(tmp_path, reference, mode, caplog)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['truncate', 'no_array_metadata', 'no_meta',
                                  'no_array_file', 'checksum_edited',
                                  'emptied'])
def test_damaged_newest_checkpoint(tmp_path, reference, mode, caplog):
  _resume_after_damage(tmp_path, reference, mode, caplog)


def test_every_checkpoint_damaged_stops(tmp_path):
  wd = tmp_path / 'all'
  _train(wd, max_steps=4)
  # A recorded checksum edited: deterministic (a byte flip can land in a
  # region of the array file that no array reads).
  for s in _ckpt_steps(wd):
    _damage(str(wd / 'checkpoints' / str(s)), 'checksum_edited')
  with pytest.raises(ckpt_lib.CheckpointError, match='no intact checkpoint'):
    _train(wd, max_steps=6)


# ------------------------------------------------------ save / config
def test_checkpoint_dir_that_is_a_file_fails_at_once(tmp_path):
  wd = tmp_path / 'run'
  wd.mkdir()
  (wd / 'checkpoints').write_text('not a directory')
  t = time.time()
  with pytest.raises(ckpt_lib.CheckpointError, match='is not a directory'):
    _train(wd, max_steps=4)
  assert time.time() - t < 30
  assert loop.exit_code_for(ckpt_lib.CheckpointError('x')) == 4
  assert (wd / 'checkpoints').read_text() == 'not a directory'


def test_failed_async_save_raises(tmp_path, monkeypatch):
  s = standin.setup(standin.config(), jax.devices())
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'ck'))

  def boom(*a, **k):
    raise OSError('No space left on device')
  monkeypatch.setattr(ck._mngr, 'save', boom)  # pylint: disable=protected-access
  with pytest.raises(ckpt_lib.CheckpointError, match='No space left'):
    ck.save(s['state'], step=1, force=True)


def test_resume_with_another_config_stops_before_writing(tmp_path):
  wd = tmp_path / 'run'
  _train(wd, max_steps=2)
  before = (wd / 'config.json').read_text()
  cfg = fault_driver.make_config(max_steps=4)
  cfg.optim.lr = 0.5
  cfg.backbone.frozen_stages = 0  # a model key
  with pytest.raises(loop.ConfigMismatchError) as e:
    loop.train(cfg, str(wd), components=fault_driver.components())
  msg = str(e.value)
  assert 'optim.lr: 0.001 in the checkpoint, 0.5 now' in msg
  assert 'backbone.frozen_stages: 1 in the checkpoint, 0 now' in msg
  assert '2 keys differ' in msg
  assert (wd / 'config.json').read_text() == before
  assert _ckpt_steps(wd) == [2]
  # allowing a key that changes the state's arrays: a clear error, the
  # intact checkpoint stays
  cfg.train.resume_may_change = ('optim.lr', 'backbone.')
  with pytest.raises(ckpt_lib.StateMismatchError, match='intact but holds '
                     'another state'):
    loop.train(cfg, str(wd), components=fault_driver.components())
  assert _ckpt_steps(wd) == [2]
  # allowed explicitly, same arrays: resumes
  cfg.backbone.frozen_stages = 1
  cfg.train.resume_may_change = ('optim.lr',)
  assert loop.train(cfg, str(wd),
                    components=fault_driver.components())['step'] == 4


def test_sigterm_exit_code():
  assert loop.exit_code_for(result={'stopped': True,
                                    'signal': signal.SIGTERM}) == 143
  assert loop.exit_code_for(result={'stopped': True,
                                    'signal': signal.SIGINT}) == 130
  assert loop.exit_code_for(result={'stopped': False}) == 0


# ------------------------------------------------------------ processes
def _driver(workdir, *args, **popen):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.Popen([sys.executable, DRIVER, str(workdir), *args],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, **popen)


def _finish(workdir, *args, timeout=300):
  p = _driver(workdir, *args)
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out.decode(errors='replace')


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(tmp_path):
  wd = tmp_path / 'run'
  p = _driver(wd, 'max_steps=40', 'step_sleep=0.2', 'checkpoint_every=100')
  deadline = time.time() + 240
  while time.time() < deadline and not (
      os.path.exists(wd / 'metrics.jsonl') and losses_by_step(wd)):
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 143, out.decode()[-2000:]
  steps = _ckpt_steps(wd)
  assert len(steps) == 1 and 0 < steps[0] < 40
  rc, out = _finish(wd, 'max_steps=40', 'checkpoint_every=100')
  assert rc == 0, out[-2000:]


TRIALS = int(os.environ.get('DDQ_KILL_TRIALS', '5'))


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path):
  """Each trial: a 12-step run (checkpoints every 2, keep 2, 0.15 s per
  batch) is killed with SIGKILL at a random moment, possibly several times,
  then resumed to the end; the per-step losses equal the uninterrupted
  run's, bitwise."""
  args = ('max_steps=12', 'checkpoint_every=2', 'keep_checkpoints=2')
  rc, out = _finish(tmp_path / 'ref', *args)
  assert rc == 0, out[-2000:]
  ref = losses_by_step(tmp_path / 'ref')
  assert sorted(ref) == list(range(1, 13))
  rnd = random.Random(1234)
  survived = 0
  for trial in range(TRIALS):
    wd = tmp_path / f'trial{trial}'
    kills = 0
    for _ in range(rnd.randint(1, 3)):
      p = _driver(wd, *args, 'step_sleep=0.15')
      # kill when a random step is done, plus a random fraction of a step:
      # lands before, during or after an async save
      target = rnd.randint(1, 11)
      deadline = time.time() + 240
      while time.time() < deadline and p.poll() is None:
        if os.path.exists(wd / 'metrics.jsonl') and max(
            losses_by_step(wd) or {0: 0}) >= target:
          break
        time.sleep(0.02)
      time.sleep(rnd.uniform(0, 0.3))
      if p.poll() is None:
        p.kill()
        kills += 1
      p.communicate(timeout=60)
    rc, out = _finish(wd, *args)
    assert rc == 0, out[-2000:]
    got = losses_by_step(wd)
    assert got == ref, (trial, got, ref)
    assert _ckpt_steps(wd) == [10, 12]
    survived += 1
    print(f'trial {trial}: {kills} kill -9, resumed, losses identical')
  assert survived == TRIALS


def _children(pid):
  out = []
  for d in os.listdir('/proc'):
    if d.isdigit():
      try:
        with open(f'/proc/{d}/stat') as f:
          if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
            out.append(int(d))
      except (OSError, IndexError, ValueError):
        pass
  return out


def _running(pid):
  try:
    with open(f'/proc/{pid}/status') as f:
      return 'State:\tZ' not in f.read()
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='needs /proc')
def test_loader_workers_die_with_a_killed_trainer():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests',
                                                     'loader_child.py')],
                       env=env, cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL)
  try:
    assert p.stdout.readline().startswith(b'ready')
    workers = _children(p.pid)
    assert len(workers) >= 2, workers
  finally:
    p.kill()
    p.wait()
  deadline = time.time() + 15
  while time.time() < deadline and any(_running(w) for w in workers):
    time.sleep(0.2)
  alive = [w for w in workers if _running(w)]
  for w in alive:  # leave nothing behind even when failing
    os.kill(w, signal.SIGKILL)
  assert not alive, f'loader workers {alive} outlived the trainer'


@pytest.mark.parametrize('solver', ['scipy', 'jax'])
def test_hungarian_survives_non_finite_costs(solver):
  """A diverged step's NaN / inf costs neither crash the host solver nor
  stall the JAX one (the step is then not applied)."""
  cost = jnp.array([[np.nan, 1.0], [np.inf, -np.inf], [0.5, 2.0]])
  out = np.asarray(jax.jit(lambda c: hungarian_match(c, solver=solver))(cost))
  assert sorted(out[out >= 0].tolist()) == [0, 1]


def test_load_params_only_skips_a_damaged_newest(tmp_path, caplog):
  wd = tmp_path / 'run'
  _train(wd, max_steps=4)
  d = str(wd / 'checkpoints')
  good = ckpt_lib.load_params_only(d, step=2)
  _damage(os.path.join(d, '4'), 'checksum_edited')  # a batch_stats array
  with caplog.at_level('ERROR', logger='ddq_jax'):
    got = ckpt_lib.load_params_only(d)
  assert 'checkpoint step 4' in caplog.text and 'checksum mismatch' in caplog.text
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ckpt_lib.CheckpointError):
    ckpt_lib.load_params_only(d, step=4)


def test_intact_checkpoint_of_another_state_is_not_set_aside(tmp_path):
  """A shape change that slipped past the config check (allowed keys) is
  a clear error, and the intact checkpoints stay where they are."""
  wd = tmp_path / 'run'
  _train(wd, max_steps=2)
  s = standin.setup(standin.config(), jax.devices())
  other = s['state'].replace(params=dict(
      s["state"].params, extra=jax.numpy.zeros((3,), jax.numpy.float32)))
  ck = ckpt_lib.Checkpointer(str(wd / 'checkpoints'))
  with pytest.raises(ckpt_lib.StateMismatchError,
                     match=r'step 2 .* intact but holds another state: 1 '
                     r'arrays differ \(params/extra: absent saved'):
    ck.restore_latest_good(other)
  assert _ckpt_steps(wd) == [2]
  assert not os.path.exists(str(wd / 'checkpoints') + '.damaged')


def test_checksum_host_and_in_graph_paths_agree():
  """A checkpoint written by one process verifies under many (and back)."""
  r = np.random.default_rng(0)
  leaves = [jnp.asarray(r.normal(size=(5, 7)).astype(np.float32)),
            jnp.asarray(r.normal(size=(9,))).astype(jnp.bfloat16),
            jnp.arange(6, dtype=jnp.int32), jnp.array([True, False]),
            jax.random.PRNGKey(3)]
  host = [integrity._host_leaf_stats(np.asarray(x)) for x in leaves]  # pylint: disable=protected-access
  dev = [(int(s), bool(f)) for s, f in
         (integrity._leaf_stats(x) for x in leaves)]  # pylint: disable=protected-access
  assert host == dev
  bumped = np.asarray(leaves[0]).copy()
  bumped.view(np.uint32)[3, 4] ^= 1  # one flipped bit
  assert integrity._host_leaf_stats(bumped)[0] != host[0][0]  # pylint: disable=protected-access
