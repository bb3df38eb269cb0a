"""Faults at the edges: result paths checked before any work and earlier
results kept, bad and extreme images, export written as one set, a full
disk, two runs on one workdir.

Fast by default; ``-m slow``: two real train.py processes on one workdir,
and a full tmpfs under the fault driver (mounted here when the test may
mount one; skipped with the reason otherwise).
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fault_driver  # noqa: E402

from ddq_jax.evaluation import cli as evaluate
from ddq_jax.serve import export, predict
from ddq_jax.train import loop, run_log
from ddq_jax.config import load_config
from ddq_jax.data.transforms import rescale_size
from ddq_jax.serve.api import Detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, 'ddq_jax', 'serve', 'assets', 'sample.jpg')
DRIVER = os.path.join(ROOT, 'tests', 'fault_driver.py')
TINY_PTH = os.path.join(ROOT, 'tests', 'data', 'tiny', 'checkpoint.pth')


def _env(**extra):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
              XLA_FLAGS='--xla_force_host_platform_device_count=1', **extra)


def _error_lines(text: str) -> list[str]:
  """The lines a user reads (progress bars and log records left out)."""
  return [l for l in text.replace('\r', '\n').splitlines()
          if l.strip() and not l.startswith(('train:', 'eval')) and
          ' INFO ' not in l and ' WARNING ' not in l]


# ----------------------------------------------------- predict / evaluate
def test_predict_out_checked_before_any_work(tmp_path, capsys):
  earlier = tmp_path / 'dets.json'
  earlier.write_text('[]  earlier results')
  t = time.time()
  for out, want in ((earlier, 'exists (earlier results are kept)'),
                    (tmp_path / 'no' / 'dets.json', 'does not exist'),
                    (tmp_path, 'a directory')):
    with pytest.raises(SystemExit) as e:
      predict.main([SAMPLE, '--weights', TINY_PTH, '--out', str(out)])
    assert e.value.code == 2 and want in capsys.readouterr().err
  assert time.time() - t < 10  # nothing loaded
  assert earlier.read_text() == '[]  earlier results'
  with pytest.raises(SystemExit):
    predict.main([SAMPLE, '--weights', TINY_PTH, '--score-threshold', '1.5'])
  assert 'in [0, 1]' in capsys.readouterr().err


def test_predict_overwrite_and_skip_bad_images(tmp_path, capsys):
  out = tmp_path / 'dets.json'
  out.write_text('old')
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'not an image')
  assert predict.main([str(bad), SAMPLE, '--weights', TINY_PTH, '--out',
                       str(out), '--overwrite']) == 2
  assert 'broken.jpg' in capsys.readouterr().err and out.read_text() == 'old'
  assert predict.main([str(bad), str(tmp_path / 'gone.png'), SAMPLE,
                       '--weights', TINY_PTH, '--out', str(out),
                       '--overwrite', '--skip-bad-images',
                       '--score-threshold', '0']) == 0
  err = capsys.readouterr().err
  assert f'skipped {bad}: not a decodable image' in err
  assert 'gone.png: no such file' in err and '2 of 3 images skipped' in err
  records = json.loads(out.read_text())
  assert records and {r['image'] for r in records} == {SAMPLE}


def test_evaluate_out_checked_before_any_work(tmp_path, capsys):
  (tmp_path / 'file').write_text('x')
  done = tmp_path / 'done'
  done.mkdir()
  (done / 'metrics.json').write_text('{"AP": 0.5}')
  base = ['--config', 'tiny', '--weights', TINY_PTH, '--no-progress']
  for out, want in ((tmp_path / 'file', 'an existing file'),
                    (done, 'holds earlier results (metrics.json)'),
                    (tmp_path / 'a' / 'b', 'does not exist')):
    with pytest.raises(SystemExit) as e:
      evaluate.main(base + ['--out', str(out)])
    assert e.value.code == 2 and want in capsys.readouterr().err
  assert (done / 'metrics.json').read_text() == '{"AP": 0.5}'
  with pytest.raises(SystemExit) as e:
    evaluate.main(base + ['--out', str(tmp_path / 'o'), '--batch-size', '0'])
  assert e.value.code == 2 and '--batch-size 0' in capsys.readouterr().err


def _coco_folder(tmp_path, *, corrupt=(), missing=(), n=3):
  """A COCO folder of the first n images of tests/data/coco_eval_tiny."""
  src = os.path.join(ROOT, 'tests', 'data', 'coco_eval_tiny')
  ann_dir = os.path.join(src, 'annotations')
  ann = json.load(open(os.path.join(ann_dir, sorted(os.listdir(ann_dir))[0])))
  images = ann['images'][:n]
  keep = {im['id'] for im in images}
  ann = dict(ann, images=images, annotations=[
      a for a in ann['annotations'] if a['image_id'] in keep])
  d = tmp_path / 'coco'
  (d / 'images').mkdir(parents=True)
  for i, im in enumerate(images):
    if i in missing:
      continue
    data = open(os.path.join(src, 'images', im['file_name']), 'rb').read()
    (d / 'images' / im['file_name']).write_bytes(
        b'corrupt' if i in corrupt else data)
  (d / 'ann.json').write_text(json.dumps(ann))
  return d, images


def _eval_args(d, out, *extra):
  return ['--config', 'tiny', '--weights', TINY_PTH, '--ann-file',
          str(d / 'ann.json'), '--image-dir', str(d / 'images'), '--out',
          str(out), '--no-progress', '--config.data.num_workers=0',
          *extra]


def test_evaluate_missing_images_strict_and_skipped(tmp_path, capsys):
  d, images = _coco_folder(tmp_path, missing=(1,), n=2)
  with pytest.raises(SystemExit) as e:
    evaluate.main(_eval_args(d, tmp_path / 'strict'))
  err = capsys.readouterr().err
  assert e.value.code == 2 and images[1]['file_name'] in err
  assert not (tmp_path / 'strict').exists()
  m = evaluate.main(_eval_args(d, tmp_path / 'skip', '--skip-bad-images'))
  err = capsys.readouterr().err
  assert f"dropped image {images[1]['file_name']}" in err
  saved = json.load(open(tmp_path / 'skip' / 'metrics.json'))
  assert saved['images_evaluated'] == 1 == m['images_evaluated']
  assert saved['images_dropped'] == 1
  assert saved['missing_files'] == [images[1]['file_name']]


@pytest.mark.slow
def test_evaluate_corrupt_image_recorded_and_strict_exit(tmp_path, capsys):
  d, images = _coco_folder(tmp_path, corrupt=(0,), n=2)
  with pytest.raises(SystemExit) as e:
    evaluate.main(_eval_args(d, tmp_path / 'strict'))
  assert e.value.code == 2
  assert f"ids {images[0]['id']}" in capsys.readouterr().err
  saved = json.load(open(tmp_path / 'strict' / 'metrics.json'))
  assert saved['dropped_image_ids'] == [images[0]['id']]
  assert saved['images_evaluated'] == 1 and saved['strict']


def test_evaluate_empty_split_is_an_error(tmp_path, capsys):
  d, _ = _coco_folder(tmp_path, n=0)
  with pytest.raises(SystemExit) as e:
    evaluate.main(_eval_args(d, tmp_path / 'o'))
  assert e.value.code == 2 and 'no image' in capsys.readouterr().err


# ------------------------------------------------------- extreme images
def test_extreme_aspect_ratios_resize_to_at_least_one_pixel():
  assert rescale_size(size_hw=(1, 5000), scale=(1333, 800))[0] == (1, 1333)
  assert rescale_size(size_hw=(3, 5000), scale=(160, 128))[0] == (1, 160)
  assert rescale_size(size_hw=(5000, 1), scale=(1333, 800))[0] == (1333, 1)
  assert rescale_size(size_hw=(480, 640), scale=(1333, 800))[0] == (800, 1067)


def test_extreme_aspect_ratios_run_in_the_detector():
  det = Detector.load(TINY_PTH, config=load_config('tiny'))
  rng = np.random.default_rng(0)
  for hw in ((1, 5000), (3, 5000), (5000, 1)):
    r = det(rng.integers(0, 255, (*hw, 3), dtype=np.uint8))
    assert len(r) and np.isfinite(r.boxes).all(), hw
    assert (r.boxes[:, 2] <= hw[1] + 1e-3).all()


# ------------------------------------------------------------------ export
def test_export_validates_before_creating_out(tmp_path, capsys, monkeypatch):
  out = tmp_path / 'exp'
  args = ['--weights', TINY_PTH, '--out', str(out), '--config', 'tiny']
  assert export.main(args + ['--canvas', '64', '64', '--format', 'jax']) == 2
  assert 'no image fits it' in capsys.readouterr().err and not out.exists()
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # not installed
  assert export.main(args + ['--canvas', '128', '160']) == 2
  err = capsys.readouterr().err
  assert export.ONNX_INSTALL in err and not out.exists()
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('mine')
  assert export.main(['--weights', TINY_PTH, '--out', str(tmp_path / 'mine'),
                      '--canvas', '128', '160', '--format', 'jax']) == 2
  assert 'not an export' in capsys.readouterr().err
  assert os.listdir(tmp_path / 'mine') == ['notes.txt']


def test_export_is_one_set_or_none(tmp_path, monkeypatch):
  out = tmp_path / 'exp'
  kw = dict(weights=TINY_PTH, out=str(out), batch=1, canvas=(128, 160),
            fmt='jax', log=lambda *a: None,
            config=__import__('ddq_jax.config').config.load_config('tiny'))
  export.export(**kw)
  before = {n: (out / n).read_bytes() for n in os.listdir(out)}
  assert sorted(before) == ['README.md', 'model.jax', 'signature.json']

  def fail(*a, **k):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(export, 'check_onnx_tools', lambda: None)
  monkeypatch.setattr(export, 'export_onnx', fail)
  with pytest.raises(OSError, match='No space left'):
    export.export(**dict(kw, fmt='both', canvas=(160, 128)))
  assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]


def test_export_install_is_documented_everywhere():
  text = open(os.path.join(ROOT, 'README.md')).read()
  assert export.ONNX_INSTALL in text
  assert export.ONNX_INSTALL in export.__doc__.replace('\n  ', ' ')
  assert 'jax2onnx==0.17.1' in open(os.path.join(ROOT, 'pyproject.toml')).read()


# ---------------------------------------------------------------- disk full
def test_log_write_failure_is_exit_4(tmp_path, monkeypatch):
  class Full:
    def write(self, _):
      raise OSError(errno.ENOSPC, 'No space left on device')
    flush = close = lambda self: None
  monkeypatch.setattr(run_log, 'open', lambda *a, **k: Full(), raising=False)
  with pytest.raises(run_log.OutputWriteError) as e:
    loop.train(fault_driver.make_config(max_steps=4), str(tmp_path / 'run'),
               components=fault_driver.components())
  assert 'No space left on device' in str(e.value)
  assert 'metrics.jsonl' in str(e.value) and '\n' not in str(e.value)
  assert loop.exit_code_for(e.value) == 4


def _driver(workdir, *args):
  return subprocess.Popen([sys.executable, DRIVER, str(workdir), *args],
                          env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_lock(workdir, proc, timeout=240):
  path = os.path.join(workdir, 'train.lock')
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and open(path).read().startswith('pid'):
      return open(path).read().strip()
    time.sleep(0.1)
  raise AssertionError(f'no lock taken: {proc.poll()}')


def test_second_run_on_a_workdir_stops_at_once(tmp_path):
  """Two fault-driver processes (train.py's ending) on one workdir."""
  wd = tmp_path / 'run'
  first = _driver(wd, 'max_steps=400', 'step_sleep=0.2')
  try:
    holder = _wait_for_lock(str(wd), first)
    t = time.time()
    second = _driver(wd, 'max_steps=4')
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, err[-2000:]
    assert time.time() - t < 60
    lines = _error_lines(err)
    assert len(lines) == 1 and f'pid {first.pid} on host' in lines[0], err
    assert holder in lines[0]
  finally:
    first.kill()
    first.communicate()
  # killed: the OS released the lock, the resume is not blocked
  rc = _driver(wd, 'max_steps=2').wait(timeout=240)
  assert rc == 0


@pytest.mark.slow
def test_two_real_train_py_on_one_workdir(tmp_path):
  """train.py itself: the second run exits 2 at once naming the holder;
  the holder's config.json and checkpoints are its own."""
  wd = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
         'tiny_synthetic', '--workdir', str(wd),
         '--config.data.num_workers=0', '--config.train.max_steps=50']
  first = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_lock(str(wd), first)
    t = time.time()
    second = subprocess.run(cmd + ['--config.optim.lr=0.5'], env=_env(),
                            cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert time.time() - t < 120
    lines = _error_lines(second.stderr)
    assert len(lines) == 1, second.stderr
    assert f'pid {first.pid} on host' in lines[0]
    assert 'Traceback' not in second.stderr
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  saved = json.load(open(wd / 'config.json'))
  assert saved['optim']['lr'] != 0.5  # the holder's config, not the second's


def _mount_tmpfs(path, size):
  """Mounts a tmpfs of ``size`` at ``path``; the reason when it cannot."""
  if sys.platform != 'linux':
    return 'tmpfs mounts need Linux'
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs',
                      str(path)], capture_output=True, text=True)
  if r.returncode:
    return f'cannot mount a tmpfs here (needs root): {r.stderr.strip()}'
  return None


def _fill(path):
  """Fills the file system of ``path`` (a file of zeros until ENOSPC)."""
  with open(os.path.join(path, 'filler'), 'wb') as f:
    try:
      while True:
        f.write(b'\0' * 65536)
        f.flush()
    except OSError as e:
      assert e.errno == errno.ENOSPC


@pytest.mark.slow
@pytest.mark.parametrize('when', ['logging', 'checkpointing'])
def test_disk_full_is_exit_4_and_one_line(tmp_path, when):
  mnt = tmp_path / 'small'
  reason = _mount_tmpfs(mnt, '16m')
  if reason:
    pytest.skip(reason)
  try:
    wd = mnt / 'run'
    every = '100' if when == 'logging' else '2'
    p = _driver(wd, 'max_steps=400', 'step_sleep=0.2',
                f'checkpoint_every={every}', 'log_every=1')
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (wd / 'metrics.jsonl').exists() and
        (wd / 'metrics.jsonl').stat().st_size and
        (when == 'logging' or os.path.isdir(wd / 'checkpoints' / '2'))):
      time.sleep(0.1)
    _fill(str(mnt))
    out, err = p.communicate(timeout=240)
    assert p.returncode == 4, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith('error: '), err[-3000:]
    assert 'No space left on device' in lines[0]
    assert 'Traceback' not in err
    if when == 'checkpointing':
      os.remove(mnt / 'filler')  # the previous checkpoint survived
      steps = sorted(int(n) for n in os.listdir(wd / 'checkpoints')
                     if n.isdigit())
      assert steps and steps[0] >= 2
  finally:
    subprocess.run(['umount', str(mnt)], check=False)
