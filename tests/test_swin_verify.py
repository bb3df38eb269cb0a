"""`python -m ddq_jax verify` on the Swin bundle (tests/data/tiny_swin): the
whole Swin DDQ-DETR against the reference, inference and training, with no
Swin-specific code in verify (the backbone type comes from meta['cfg'])."""
import os

import pytest

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
