"""The table of weight formats (ddq_jax/io/weight_formats.py): which format
a path is, and the one error for a path none accepts."""
import numpy as np
import pytest

from ddq_jax.io import weight_formats as wf
from ddq_jax.io import weights
from ddq_jax.io.conversion import torch_pickle

T = np.zeros((1,), np.float32)
STATE_DICTS = {
    'tv.pth': {'conv1.weight': T, 'layer1.0.conv1.weight': T, 'fc.weight': T},
    'swin.pth': {'patch_embed.proj.weight': T,
                 'layers.0.blocks.0.attn.qkv.weight': T},
    'det.pth': {'backbone.conv1.weight': T, 'bbox_head.x.bias': T},
    'other.pth': {'classifier.weight': T},
}


@pytest.fixture
def files(tmp_path, monkeypatch):
  reads = []
  for name in STATE_DICTS:
    (tmp_path / name).write_bytes(b'')

  def load(path):
    reads.append(path)
    return {'state_dict': STATE_DICTS[path.rsplit('/', 1)[-1]]}
  monkeypatch.setattr(torch_pickle, 'load_torch_checkpoint', load)
  (tmp_path / 'conv').mkdir()
  (tmp_path / 'conv' / 'variables.msgpack').write_bytes(b'')
  (tmp_path / 'run' / 'checkpoints' / '7' / 'state').mkdir(parents=True)
  (tmp_path / 'empty').mkdir()
  return tmp_path, reads


def test_each_path_its_format(files):
  root, reads = files
  want = {'conv': 'converted', 'run': 'train_checkpoint',
          'run/checkpoints': 'train_checkpoint',
          'run/checkpoints/7': 'train_checkpoint', 'tv.pth': 'torchvision',
          'swin.pth': 'official_swin', 'det.pth': 'mmdet'}
  for rel, name in want.items():
    fmt, _ = wf.identify(str(root / rel))
    assert fmt.name == name, rel
    assert wf.BY_NAME[name] is fmt
  assert len(reads) == 3  # one read per file, shared by the predicates
  assert wf.train_run(str(root / 'run' / 'checkpoints' / '7')) == (
      str(root / 'run' / 'checkpoints'), 7)


def test_unknown_and_missing_name_the_path_and_the_formats(files):
  root, _ = files
  for rel in ('other.pth', 'empty'):
    with pytest.raises(wf.UnknownWeightFormat) as e:
      wf.identify(str(root / rel))
    msg = str(e.value)
    assert str(root / rel) in msg
    assert all(f'{f.name}: ' in msg for f in wf.FORMATS)
  with pytest.raises(FileNotFoundError, match='no such file.*mmdet: '):
    wf.identify(str(root / 'nope.pth'))


def test_backbone_formats_are_not_a_whole_detector(files):
  root, _ = files
  with pytest.raises(ValueError, match='torchvision ResNet .*init_from'):
    weights.read_weights(str(root / 'tv.pth'))
