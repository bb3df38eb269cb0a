"""Deviceless TPU / GPU compiles (ddq_jax/tools/accelerators): the --target
grammar, the optimised-HLO collective / callback counts, and (slow, skipped
without the compilers) the tiny training step compiled for one TPU and one
GPU target in a process of its own."""
import importlib.util
import json
import subprocess
import sys

import pytest

from ddq_jax.tools.accelerators import hlo_stats
from ddq_jax.tools.accelerators.targets import TargetError, gpu_target_config, parse_target
from ddq_jax.tools.benchmark import main


def test_parse_target_forms():
  t = parse_target('tpu:v5e:2x4')
  assert (t.platform, t.name) == ('tpu', 'v5e:2x4')
  assert parse_target('tpu:v4:2x2x1').name == 'v4:2x2x1'
  g = parse_target('gpu:h100:8')
  assert (g.platform, g.name, g.hosts, g.per_host) == ('gpu', 'h100', 1, 8)
  assert parse_target('gpu:h200').per_host == 8
  g = parse_target('GPU:A100:2x4')
  assert (g.name, g.hosts, g.per_host) == ('a100', 2, 4)


@pytest.mark.parametrize('spec', ['', 'cpu', 'tpu', 'tpu:v5e', 'tpu:v5e:2x',
                                  'gpu:h300', 'gpu:h100:0', 'gpu:h100:x8',
                                  'tpu:2x4'])
def test_parse_target_rejects(spec):
  with pytest.raises(TargetError, match="expected 'tpu:<topology>'"):
    parse_target(spec)


def test_benchmark_bad_target_exits_2(capsys):
  with pytest.raises(SystemExit) as e:
    main(['--config', 'tiny', '--target', 'gpu:h300'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'gpu:<chip>[:<count>]' in err[0]


def test_gpu_target_configs_ship():
  for chip, name in (('h100', 'H100'), ('h200', 'H200'), ('a100', '')):
    text = gpu_target_config(chip)
    assert 'gpu_device_info' in text and name in text
    assert 'collective_memory_granularity' not in text


HLO = '''
HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %ar.1 = f32[8,4]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %ar.1)
}

ENTRY %main (x: f32[8,4]) -> f32[64,4] {
  %ags = (f32[8,4]{1,0}, f32[64,4]{1,0}) all-gather-start(%x), dimensions={0}
  %agd = f32[64,4]{1,0} all-gather-done(%ags)
  %ar.2 = (f32[8,4]{1,0}, bf16[2]{0}) all-reduce(%x, %y), to_apply=%add
  %rs = f32[1,4]{1,0} reduce-scatter(%x), dimensions={0}, to_apply=%add
  %cp = f32[8,4]{1,0} collective-permute-done(%cps)
  %cb = (f32[2]{0}) custom-call(%x), custom_call_target="xla_ffi_python_gpu_callback"
  %snd = (f32[2]{0}, u32[], token[]) send(%x, %tok), channel_id=1, is_host_transfer=true
  %ard = f32[8,4]{1,0} all-reduce-done(%ars)
  ROOT %out = f32[64,4]{1,0} copy(%agd)
}
'''


def test_collectives_by_kind():
  c = hlo_stats.collectives(HLO)
  assert c['all-gather'] == {'count': 1, 'bytes': 64 * 4 * 4}
  # one in the while body (counted once), a tuple one, an async -done
  assert c['all-reduce'] == {'count': 3, 'bytes': 128 + (128 + 4) + 128}
  assert c['reduce-scatter'] == {'count': 1, 'bytes': 16}
  assert c['collective-permute'] == {'count': 1, 'bytes': 128}
  assert hlo_stats.host_callbacks(HLO) == 2


def _have(module):
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:
    return False


def _compile(target):
  """The tiny training step for ``target``, in its own process (the CPU
  runtime must be chosen before any backend starts)."""
  out = subprocess.run(
      [sys.executable, '-m', 'ddq_jax.tools.benchmark', '--config', 'tiny',
       '--mode', 'train', '--target', target, '--batch-per-chip', '2',
       '--size', '128', '128', '--config.loss.hungarian_solver=jax'],
      capture_output=True, text=True, timeout=1800, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res['target'] == target and res['devices'] == 8
  assert res['batch'] == 16 and res['batch_per_chip'] == 2
  assert 0 < res['temp_memory_gb'] <= res['peak_memory_gb'] < 2
  assert res['hlo_lines'] > 1000 and res['gflops'] > 0
  assert res['collectives']['all-reduce']['count'] > 0  # the gradients
  assert res['host_callbacks'] == 0
  return res


@pytest.mark.slow
@pytest.mark.skipif(not _have('libtpu'),
                    reason="libtpu missing (pip install 'ddq-jax[tpu]')")
def test_tiny_train_step_compiles_for_tpu():
  res = _compile('tpu:v5e:2x4')
  assert res['device_kind'].startswith('TPU v5')


@pytest.mark.slow
@pytest.mark.skipif(not (_have('jax_cuda12_plugin') or
                         _have('jax_cuda13_plugin')),
                    reason="jax CUDA plugin missing (pip install "
                    "'ddq-jax[cuda]')")
def test_tiny_train_step_compiles_for_gpu_default_flags():
  """Default XLA flags: the decoder's per-image projections keep Triton's
  GEMM tiling satisfiable (backend.per_image_attention_projections)."""
  res = _compile('gpu:h100:8')
  assert 'H100' in res['device_kind'] and res['compiler_options'] == {}
