"""convert_weights never deletes a user's file: --out holding other files,
--out naming a file, the source checkpoint inside --out."""
import os
import shutil

import pytest

from ddq_jax.io.conversion import cli, weights_io


@pytest.fixture()
def src(tmp_path, tiny_dir):
  d = tmp_path / 'w'
  d.mkdir()
  shutil.copy(os.path.join(tiny_dir, 'checkpoint.pth'), d / 'ddq.pth')
  (d / 'notes.txt').write_text('mine')
  return d


def _listing(d):
  return sorted(os.listdir(d))


def test_out_holding_user_files_and_the_source_is_refused(src, capsys):
  before = {n: (src / n).read_bytes() for n in os.listdir(src)}
  assert cli.main([str(src / 'ddq.pth'), '--out', str(src)]) == 2
  err = capsys.readouterr().err
  assert 'non-empty directory' in err and '--overwrite' in err
  assert {n: (src / n).read_bytes() for n in os.listdir(src)} == before
  # --overwrite writes our files next to the user's, which all survive.
  assert cli.main([str(src / 'ddq.pth'), '--out', str(src),
                   '--overwrite']) == 0
  assert _listing(src) == sorted(['ddq.pth', 'notes.txt'] +
                                 list(weights_io.OUR_FILES))
  for n, data in before.items():
    assert (src / n).read_bytes() == data
  weights_io.load_converted(str(src))
  assert not [n for n in os.listdir(src.parent) if n.startswith('.')]


def test_out_naming_a_file_is_refused(src, capsys):
  target = src / 'notes.txt'
  assert cli.main([str(src / 'ddq.pth'), '--out', str(target)]) == 2
  assert 'is an existing file' in capsys.readouterr().err
  assert target.read_text() == 'mine'
  assert not os.path.exists(str(target) + '.old')


def test_input_is_never_replaced(tmp_path, tiny_dir, capsys):
  out = tmp_path / 'out'
  out.mkdir()
  shutil.copy(os.path.join(tiny_dir, 'checkpoint.pth'),
              out / weights_io.VARIABLES_FILE)
  data = (out / weights_io.VARIABLES_FILE).read_bytes()
  for extra in ([], ['--overwrite']):
    assert cli.main([str(out / weights_io.VARIABLES_FILE), '--out', str(out)]
                    + extra) == 2
    assert 'would replace the input' in capsys.readouterr().err
  assert (out / weights_io.VARIABLES_FILE).read_bytes() == data


def test_previous_conversion_is_replaced_and_old_sibling_kept(src, tmp_path):
  out = tmp_path / 'conv'
  keep = tmp_path / 'conv.old'  # a user's directory with that name survives
  keep.mkdir()
  (keep / 'x').write_text('x')
  assert cli.main([str(src / 'ddq.pth'), '--out', str(out)]) == 0
  first = (out / weights_io.VARIABLES_FILE).read_bytes()
  assert cli.main([str(src / 'ddq.pth'), '--out', str(out)]) == 0
  assert _listing(out) == sorted(weights_io.OUR_FILES)
  assert (out / weights_io.VARIABLES_FILE).read_bytes() == first
  assert (keep / 'x').read_text() == 'x'
  assert sorted(os.listdir(tmp_path)) == ['conv', 'conv.old', 'w']
