"""The benchmark harness: HLO parsing, stage attribution, profile self
times, and one short end-to-end run (tiny, infer, 2 fake CPU devices)."""
import json

import pytest

from ddq_jax.tools.benchmark import main
from ddq_jax.tools.profiling import hlo_instructions, self_times, stage_of

HLO = '''
HloModule jit_f

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %exp.1 = f32[4]{0} exponential(%param_0), metadata={op_name="jit(f)/DDQDETR/DDQDETR.forward_encoder/backbone/layer1_0/conv1/exp"}
}

%fused_computation.2 (param_0.1: f32[4], param_1.1: f32[4]) -> f32[4] {
  %param_0.1 = f32[4]{0} parameter(0)
  %param_1.1 = f32[4]{0} parameter(1)
  %dot.1 = f32[4]{0} dot(%param_0.1, %param_1.1), metadata={op_name="jit(f)/DDQDETR/DDQDETR.forward_encoder/encoder/layers_0/ffn/layers_0_0/dot_general"}
  ROOT %reduce.1 = f32[4]{0} add(%dot.1, %dot.1), metadata={op_name="jit(f)/DDQDETR/DDQDETR.forward_encoder/encoder/layers_0/norms_1/reduce_sum"}
}

ENTRY %main (x: f32[4], y: f32[2,3]) -> (f32[4], f32[2,3]) {
  %x = f32[4]{0} parameter(0), metadata={op_name="x"}
  %y = f32[2,3]{1,0} parameter(1)
  %conv.3 = f32[4]{0} convolution(%x, %x), dim_labels=b0f_0io->b0f, metadata={op_name="jit(f)/DDQDETR/DDQDETR.forward_encoder/neck/convs_0/conv/conv_general_dilated" source_file="a.py" source_line=3}
  %dot.7 = f32[2,3]{1,0} dot(%conv.3, %y), lhs_contracting_dims={0}
  %w = (s32[], f32[4]{0}) while(%t), condition=%c, body=%b, metadata={op_name="jit(f)/DDQDETR/DDQDETR.run_decoder/decoder/vmap()/while"}
  %ynn_fusion.4 = f32[4]{0} fusion(%x, %x), kind=kCustom, calls=%fused_computation.2, metadata={op_name="jit(f)/DDQDETR/DDQDETR.forward_encoder/encoder/layers_0/norms_1/reduce_sum"}
  ROOT %tuple.9 = (f32[4]{0}, f32[2,3]{1,0}) tuple(%conv.3, %dot.7)
}
'''


def test_hlo_instructions():
  d = hlo_instructions(HLO)
  assert d['conv.3'][0] == 'convolution'
  assert d['conv.3'][1].endswith('neck/convs_0/conv/conv_general_dilated')
  assert d['exp.1'][0] == 'exponential'
  assert d['w'][0] == 'while'
  # no metadata: inherits its first operand's scope
  assert d['dot.7'] == ('dot', d['conv.3'][1])
  assert stage_of(d['conv.3'][1]) == 'neck'
  # a fusion is named after its heaviest op (the FFN dot), not its root
  assert d['ynn_fusion.4'][1].endswith('ffn/layers_0_0/dot_general')
  assert stage_of(d['exp.1'][1]) == 'backbone'
  assert stage_of(d['w'][1]) == 'decoder NMS loop'


def test_stage_of():
  enc = 'jit(f)/DDQDETR/DDQDETR.forward_encoder/encoder/layers_0/self_attn/'
  dec = 'jit(f)/DDQDETR/DDQDETR.run_decoder/decoder/layers_1/cross_attn/'
  assert stage_of(enc + 'vmap(jit(_take))/gather') == \
      'encoder deform-attn sampling'
  assert stage_of(enc + 'sampling_offsets/dot_general') == \
      'encoder deform-attn projections'
  assert stage_of(dec + 'mul') == 'decoder deform-attn sampling'
  assert stage_of('jit(s)/transpose(jvp(DDQDETR))/DDQDETR.forward_encoder/'
                  'backbone/layer2_0/conv1/x') == 'bwd backbone'
  assert stage_of('jit(s)/jvp(loss)/pure_callback', 'custom-call') == \
      'hungarian (scipy host callback)'
  assert stage_of('jit(s)/jvp(loss)/vmap()/while/body/add') == \
      'loss: while loops (jax hungarian)'
  assert stage_of('jit(s)/mul') == 'optimizer / other'
  assert stage_of("params['neck']['convs_0']['conv']['kernel']") == \
      'param-named ops (weight layout copies, optimizer)'
  assert stage_of('jit(s)/DDQDETR/DDQDETR.select_distinct/vmap()/while') == \
      'pre_decoder NMS loop'


def test_self_times_nested():
  ev = [dict(ph='X', pid=1, tid=1, ts=0.0, dur=100.0, name='w'),
        dict(ph='X', pid=1, tid=1, ts=10.0, dur=30.0, name='a'),
        dict(ph='X', pid=1, tid=1, ts=50.0, dur=20.0, name='a'),
        dict(ph='X', pid=1, tid=1, ts=55.0, dur=5.0, name='b'),
        dict(ph='X', pid=1, tid=2, ts=0.0, dur=7.0, name='b'),
        dict(ph='X', pid=1, tid=1, ts=200.0, dur=9.0, name='python_thing')]
  t = self_times(ev, {'w', 'a', 'b'})
  assert t == {'w': 50.0, 'a': 45.0, 'b': 12.0}


def test_benchmark_infer_end_to_end(tiny_dir, capsys):
  res = main(['--config', 'tiny', '--mode', 'infer', '--batch', '2',
              '--size', '128', '128', '--devices', '2', '--steps', '2',
              '--warmup', '0', '--weights', f'{tiny_dir}/checkpoint.pth',
              '--no-compilation-cache'])
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(line) == res
  assert res['mode'] == 'infer' and res['devices'] == 2
  assert res['compile_s'] > 0 and 0 < res['step_min_s'] <= res['step_median_s']
  for k in ('peak_memory_gb', 'temp_memory_gb', 'gflops', 'hlo_lines',
            'lower_s'):
    assert res[k] > 0, k
  assert res['images_per_s'] > 0
  assert res['hot_ops'] and res['stages']
  assert abs(sum(s['share'] for s in res['stages'].values()) - 1) < 1e-2
  assert any('deform-attn' in k or k == 'backbone' for k in
             list(res['stages'])[:3])


def test_benchmark_compile_only(capsys):
  """--compile-only: XLA's figures of the compiled step, no step run."""
  res = main(['--config', 'tiny', '--mode', 'infer', '--batch', '1',
              '--size', '64', '64', '--devices', '1', '--compile-only',
              '--no-compilation-cache'])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res
  assert res['compile_only'] is True and 'step_median_s' not in res
  assert res['hlo_lines'] > 100 and res['gflops'] > 0
  assert res['peak_memory_gb'] >= res['temp_memory_gb'] > 0
  assert res['lower_s'] > 0 and res['compile_s'] > 0


def test_benchmark_rejects_empty_batch_and_size(capsys):
  for args, want in ((['--batch', '0'], '--batch must be >= 1, got 0'),
                     (['--size', '0', '0'], '--size 0 0: expected a positive'),
                     (['--steps', '0'], '--steps must be >= 1, got 0')):
    with pytest.raises(SystemExit) as e:
      main(['--config', 'tiny', '--no-compilation-cache', *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert want in err and len(err.splitlines()) == 1
