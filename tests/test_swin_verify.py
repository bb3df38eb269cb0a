"""`python -m ddq_jax verify` on the Swin bundle (tests/data/tiny_swin): the
whole Swin DDQ-DETR against the reference, inference and training, with no
Swin-specific code in verify (the backbone type comes from meta['cfg']);
and padding-invariant inference on canvases against the reference's
batch-1 runs (tiny_swin_single)."""
import os

import pytest

from ddq_jax.config import load_config
from ddq_jax.parity import verify

TINY_SWIN = os.path.join(os.path.dirname(__file__), 'data', 'tiny_swin')


def _run(train):
  lines = []
  ok = verify.verify(TINY_SWIN, train=train, out=lines.append)
  failures = [l for l in lines if l.startswith('FAIL')]
  assert ok and not failures, '\n'.join(failures)
  assert 'config converted_ddq_swinl_4scale' in lines[0]
  return lines


def test_inference_every_tensor_within_target():
  lines = _run(train=False)
  assert lines[-1].startswith('32 of 32'), lines[-1]


@pytest.mark.slow  # ~2-3 minutes on 2 cores: the training graph's compile
def test_training_every_tensor_within_target():
  lines = _run(train=True)
  assert lines[-1].startswith('121 of 121'), lines[-1]
  for name in ('patch_embed.projection.weight',
               'stages.0.blocks.0.attn.w_msa.relative_position_bias_table',
               'stages.2.downsample.reduction.weight', 'norm3.weight'):
    assert any(l.startswith('ok') and f'grad/backbone.{name}' in l
               for l in lines), name


# Padding invariance against the reference's batch-1 runs
# (tests/data/tiny_swin_single/{a,b}: 77x131 and 139x83, run alone).
SINGLE = os.path.join(os.path.dirname(__file__), 'data', 'tiny_swin_single')


def _single_bundle(tmp_path, name):
  bundle = tmp_path / name
  bundle.mkdir()
  for f in ('inputs.npz', 'infer.npz'):
    os.symlink(os.path.join(SINGLE, name, f), bundle / f)
  os.symlink(os.path.join(TINY_SWIN, 'checkpoint.pth'),
             bundle / 'checkpoint.pth')
  return str(bundle)


# Canvases: the image's own size (batch 1, unpadded); 139x131 and 97x150,
# which no stage's window grid (16, 32, 64, 128 px) divides; 320x384, far
# larger than the image.
@pytest.mark.parametrize('name,canvas', [
    ('a', None), ('a', (139, 131)), ('b', (144, 200)),
    pytest.param('a', (97, 150), marks=pytest.mark.slow),
    pytest.param('b', (320, 384), marks=pytest.mark.slow)])
def test_padding_invariant_equals_batch1_reference(tmp_path, name, canvas):
  lines = []
  ok = verify.verify(_single_bundle(tmp_path, name), padding_invariant=True,
                     canvas=canvas, out=lines.append)
  failures = [l for l in lines if l.startswith('FAIL')]
  assert ok and not failures, '\n'.join(failures)
  assert lines[-1].startswith('29 of 29'), lines[-1]
  for key in ('backbone_feat_0', 'backbone_feat_2', 'memory',
              'hidden_states', 'det_bboxes', 'det_labels', 'topk_indices'):
    assert any(l.startswith('ok') and f' {key} ' in l for l in lines), key


def test_swin_configs_are_padding_invariant():
  """Evaluation is padding-invariant by default; training keeps the
  reference's batched padding (DDQDETR: ``not train and ...``)."""
  for name in ('ddq_swinl_4scale', 'tiny_swin'):
    assert load_config(name).padding_invariant, name
