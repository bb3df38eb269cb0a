"""Nothing silently wrong: weights that do not fit their config (every entry
point, every format), non-finite weights, a training workdir with one
owner, and the config values training refuses.

Fast cases only; the processes (two train.py on one workdir, a full disk)
are in tests/test_faults_io.py.
"""
import os
import shutil
import socket
import sys

from flax import serialization
import jax
import numpy as np
import pytest

import ddq_jax
from ddq_jax.config import load_config
from ddq_jax.evaluation import cli as evaluate
from ddq_jax.io.conversion import cli as convert_cli
from ddq_jax.io.conversion import weights_io
from ddq_jax.io.weights import load_pretrained
from ddq_jax.io.weights_fit import (check_fit, expected_shapes, fit_problems,
    flatten, WeightsMismatchError)
from ddq_jax.serve import export, predict
from ddq_jax.serve.api import Detector
from ddq_jax.train import checkpoint as ckpt_lib
from ddq_jax.train import cli as train_cli
from ddq_jax.train import loop
from ddq_jax.train import optimizer as opt_lib
from ddq_jax.train import state as state_lib
from ddq_jax.train import workdir as workdir_lib
from ddq_jax.train.parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, 'ddq_jax', 'serve', 'assets', 'sample.jpg')


@pytest.fixture(scope='module')
def converted(tmp_path_factory, tiny_dir):
  out = str(tmp_path_factory.mktemp('conv') / 'w')
  assert convert_cli.main([os.path.join(tiny_dir, 'checkpoint.pth'), '--out',
                           out]) == 0
  return out


def _train_main():
  return train_cli.main


# ------------------------------------------------------------ weights fit
def test_fit_problems_names_each_kind():
  got = {'params': {'a': np.zeros((2, 3)), 'b': np.zeros(4)},
         'batch_stats': {'m': np.zeros(1)}}
  want = {'params/a': (2, 4), 'params/c': (1,), 'batch_stats/m': (1,)}
  p = fit_problems(got, want)
  assert p == {'missing': ['params/c'], 'unexpected': ['params/b'],
               'misshaped': [('params/a', (2, 3), (2, 4))]}


def test_fewer_decoder_layers_refused_at_every_entry_point(converted, capsys,
                                                           tmp_path):
  assert predict.main([SAMPLE, '--weights', converted,
                       '--config.num_decoder_layers=2']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert 'mis-shaped (params/bbox_head' in err  # stacked: 3 layers vs 2
  assert "num_decoder_layers=2 (weights: 3)" in err
  with pytest.raises(WeightsMismatchError, match='num_encoder_layers=1'):
    Detector.load(converted, overrides={'num_encoder_layers': 1})
  out = tmp_path / 'export'
  assert export.main(['--weights', converted, '--out', str(out), '--canvas',
                      '128', '160', '--format', 'jax',
                      '--config.num_decoder_layers=2']) == 2
  assert 'do not fit the model' in capsys.readouterr().err
  assert not out.exists()
  with pytest.raises(SystemExit) as e:
    evaluate.main(['--weights', converted, '--out', str(tmp_path / 'ev'),
                   '--config.num_decoder_layers=2', '--no-progress'])
  assert e.value.code == 2
  assert 'num_decoder_layers=2' in capsys.readouterr().err
  assert not (tmp_path / 'ev').exists()


def test_num_classes_mismatch_is_one_line_not_a_traceback(tiny_dir):
  assert ddq_jax.WeightsMismatchError is WeightsMismatchError
  pth = os.path.join(tiny_dir, 'checkpoint.pth')
  with pytest.raises(WeightsMismatchError) as e:
    Detector.load(pth, overrides={'num_classes': 5})
  msg = str(e.value)
  assert '\n' not in msg and 'mis-shaped' in msg
  # The head's branches are stacked (3 aux class branches here).
  assert '(3, 64, 80) in the weights, (3, 64, 5) in the model' in msg
  assert 'num_classes=5 (weights: 80)' in msg
  with pytest.raises(WeightsMismatchError, match='mis-shaped'):  # --config
    Detector.load(pth, config=load_config('tiny', {'num_classes': 5}))


def test_partial_load_is_an_explicit_opt_in(tiny_variables):
  cfg = load_config('tiny', {'num_classes': 5})
  with pytest.raises(WeightsMismatchError, match='init_from_partial'):
    check_fit(tiny_variables, cfg, opt_in='--config.train.init_from_partial'
              '=True')
  kept = check_fit(tiny_variables, cfg, allow_partial=True)
  p = fit_problems(kept, {k: v for k, v in _shapes(cfg).items()})
  assert not p['unexpected'] and not p['misshaped']
  # The class branches' kernels and biases (stacked) and the label embedding.
  assert len(p['missing']) == 5 and all(
      'cls_branches' in m or 'label_embedding' in m for m in p['missing'])


def _shapes(cfg):
  return expected_shapes(cfg)


def test_train_checkpoint_is_checked_too(tmp_path, tiny_variables):
  """A train.py workdir (config.json + checkpoints/<step>) as weights."""
  cfg = load_config('tiny')
  tx, _ = opt_lib.make_optimizer(cfg, 10)
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:1])
  state, _ = state_lib.init_train_state(
      lambda rng: jax.tree.map(np.asarray, tiny_variables), tx,
      jax.random.PRNGKey(0), mesh)
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'run' / 'checkpoints'))
  assert ck.save(state, step=1, config=cfg, force=True)
  ck.close()
  (tmp_path / 'run' / 'config.json').write_text(cfg.to_json_best_effort())
  with pytest.raises(WeightsMismatchError, match='num_decoder_layers=2'):
    Detector.load(str(tmp_path / 'run'), overrides={'num_decoder_layers': 2})
  assert Detector.load(str(tmp_path / 'run')).config.num_decoder_layers == 3


def test_non_finite_weights_refused_at_conversion_and_load(
    tmp_path, converted, tiny_variables, capsys):
  bad = jax_tree_copy(tiny_variables)
  bad['params']['bbox_head']['cls_branches']['bias'][0, 3] = np.nan
  with pytest.raises(ValueError, match='NaN or infinite.*cls_branches/bias'):
    weights_io.save_converted(str(tmp_path / 'nan'), bad, load_config('tiny'))
  assert not (tmp_path / 'nan').exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.tmp-')]
  # a converted directory edited afterwards: refused at load
  d = tmp_path / 'edited'
  shutil.copytree(converted, d)
  (d / weights_io.VARIABLES_FILE).write_bytes(
      serialization.msgpack_serialize(bad))
  with pytest.raises(WeightsMismatchError, match='NaN or infinite'):
    Detector.load(str(d))


def jax_tree_copy(tree):
  if isinstance(tree, dict):
    return {k: jax_tree_copy(v) for k, v in tree.items()}
  return np.array(tree, copy=True)


def test_stale_temporaries_of_a_killed_conversion_are_removed(
    tmp_path, tiny_dir):
  dead_pid = 2 ** 22 + 12345  # above pid_max's default: never alive
  stale = tmp_path / f'.tmp-w.{dead_pid}.abc123'
  stale.mkdir()
  (stale / weights_io.VARIABLES_FILE).write_bytes(b'half')
  old_style = tmp_path / '.tmp-wq1w2e3r4'
  old_style.mkdir()
  live = tmp_path / f'.tmp-w.{os.getpid()}.zzz'  # a running conversion's
  live.mkdir()
  mine = tmp_path / '.tmp-w.1.user'  # not only our files: kept
  mine.mkdir()
  (mine / 'notes.txt').write_text('mine')
  assert convert_cli.main([os.path.join(tiny_dir, 'checkpoint.pth'), '--out',
                           str(tmp_path / 'w')]) == 0
  left = sorted(n for n in os.listdir(tmp_path) if n.startswith('.'))
  assert left == sorted([live.name, mine.name])


def test_config_json_that_is_not_json_is_named(tmp_path, converted, capsys):
  d = tmp_path / 'w'
  shutil.copytree(converted, d)
  (d / 'config.json').write_text('{not json')
  assert predict.main([SAMPLE, '--weights', str(d)]) == 2
  err = capsys.readouterr().err
  assert str(d / 'config.json') in err and 'not a JSON config' in err


# ---------------------------------------------------------------- workdir
def test_workdir_kinds(tmp_path, converted):
  assert workdir_lib.check_workdir(str(tmp_path / 'new')) == 'new'
  (tmp_path / 'empty').mkdir()
  assert workdir_lib.check_workdir(str(tmp_path / 'empty')) == 'new'
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)
  (run / 'metrics.jsonl').write_text('')
  assert workdir_lib.check_workdir(str(run)) == 'run'
  with pytest.raises(workdir_lib.WorkdirError, match='converted-weights '
                     'folder .*init_from='):
    workdir_lib.check_workdir(converted)
  (tmp_path / 'photos').mkdir()
  (tmp_path / 'photos' / 'cat.jpg').write_bytes(b'x')
  with pytest.raises(workdir_lib.WorkdirError, match=r'cat\.jpg'):
    workdir_lib.check_workdir(str(tmp_path / 'photos'))
  (tmp_path / 'f').write_text('x')
  with pytest.raises(workdir_lib.WorkdirError, match='existing file'):
    workdir_lib.check_workdir(str(tmp_path / 'f'))


def test_train_py_never_writes_into_converted_weights(converted, capsys):
  before = {n: open(os.path.join(converted, n), 'rb').read()
            for n in os.listdir(converted)}
  with pytest.raises(SystemExit) as e:
    _train_main()(['--config', 'tiny', '--workdir', converted])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'converted-weights folder' in err
  assert {n: open(os.path.join(converted, n), 'rb').read()
          for n in os.listdir(converted)} == before


def test_lock_names_the_holder_and_is_reentrant(tmp_path):
  wd = str(tmp_path / 'run')
  with workdir_lib.hold(wd):
    with workdir_lib.hold(wd):  # the same process again: fine
      pass
    with pytest.raises(workdir_lib.WorkdirError) as e:
      workdir_lib._acquire(wd)  # pylint: disable=protected-access
    msg = str(e.value)
    assert f'pid {os.getpid()} on host {socket.gethostname()}' in msg
  fd = workdir_lib._acquire(wd)  # released: free again  # pylint: disable=protected-access
  os.close(fd)


@pytest.mark.parametrize('key,value,want', [
    ('max_steps', -2, "'train.max_steps' is -2"),
    ('global_batch_size', 0, "'train.global_batch_size' is 0"),
    ('checkpoint_every', 0, "'train.checkpoint_every' is 0")])
def test_train_config_values_refused(tmp_path, capsys, key, value, want):
  with pytest.raises(SystemExit) as e:
    _train_main()(['--config', 'tiny', '--workdir', str(tmp_path / 'r'),
                   f'--config.train.{key}={value}'])
  assert e.value.code == 2
  assert want in capsys.readouterr().err
  assert not (tmp_path / 'r').exists()


def test_bad_init_from_is_exit_2_one_line(tmp_path):
  sys.path.insert(0, os.path.dirname(__file__))
  import fault_driver  # a script beside the tests (sys.path above)
  text = tmp_path / 'notes.txt'
  text.write_text('not weights')
  for path in (str(text), str(tmp_path / 'missing'),
               os.path.join(ROOT, 'configs')):
    cfg = fault_driver.make_config(max_steps=1, init_from=path)
    with pytest.raises(loop.InitFromError) as e:
      loop.train(cfg, str(tmp_path / f'run{len(path)}'),
                 components=fault_driver.components())
    assert '\n' not in str(e.value) and path in str(e.value)
    assert loop.exit_code_for(e.value) == 2


def test_init_from_partial_drops_what_does_not_fit(converted):
  cfg = load_config('tiny', {'num_classes': 5})
  with pytest.raises(WeightsMismatchError,
                     match=r'--config\.train\.init_from_partial=True'):
    load_pretrained(converted, cfg)
  cfg.train.init_from_partial = True
  kept = flatten(load_pretrained(converted, cfg))
  assert 'params/bbox_head/cls_branches/kernel' not in kept
  assert 'params/bbox_head/reg_branches/0/kernel' in kept
