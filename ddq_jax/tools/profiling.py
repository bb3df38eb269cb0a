"""Hot spots of a compiled step: XLA profile events matched to the
optimised HLO's instructions, whose ``op_name`` metadata carries the Flax
module path; self time summed per instruction and per model stage (see
``ddq_jax.tools.benchmark``'s docstring for the method).  ``analyze`` reads a saved
trace."""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\s([a-z][\w\-]*)\(')
_OPNAME = re.compile(r'op_name="([^"]*)"')
_PROJ = ('value_proj', 'sampling_offsets', 'attention_weights', 'output_proj')


_HEAVY = ('convolution', 'dot', 'gather', 'scatter', 'sort', 'reduce-window')
_COMP = re.compile(r'^%?([\w.\-]+)\s.*\{\s*$')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, op_name metadata)} of an HLO module text.

  A fusion is named after the heaviest op it fuses (a convolution or dot
  before a gather / scatter / sort, before its root), not its root: XLA:CPU
  fuses e.g. a LayerNorm reduction after an FFN matmul, whose root op_name
  would hide the matmul.  An instruction without metadata (XLA-created, e.g.
  an einsum's dot after layout passes) inherits the op_name of its first
  operand that has one."""
  out, operands, calls = {}, {}, {}
  heavy: dict[str, list] = {}  # computation -> [(rank, op_name)]
  comp = None
  for line in hlo_text.splitlines():
    c = _COMP.match(line)
    if c and '=' not in line.split('{', 1)[0]:
      comp = c.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    op = _OPNAME.search(line)
    name, opcode = m.group(1), m.group(2)
    out[name] = (opcode, op.group(1) if op else '')
    if op and opcode in _HEAVY and comp is not None:
      heavy.setdefault(comp, []).append((_HEAVY.index(opcode), op.group(1)))
    k = _CALLS.search(line)
    if opcode == 'fusion' and k:
      calls[name] = k.group(1)
    if not op:
      args = line[m.end():].split('), ', 1)[0]
      operands[name] = re.findall(r'%([\w.\-]+)', args)
  for name, callee in calls.items():
    if heavy.get(callee):
      out[name] = (out[name][0], min(heavy[callee])[1])
  for _ in range(4):  # chains of metadata-less instructions
    for name, ops in operands.items():
      if not out[name][1]:
        # an operand computed in the program beats a parameter (whose
        # op_name is just the argument's name)
        named = [out[o][1] for o in ops if o in out and out[o][1]]
        traced = [n for n in named if n.startswith('jit(')]
        if traced or named:
          out[name] = (out[name][0], (traced or named)[0])
  return out


def _attn_part(rest: str, where: str) -> str:
  nxt = rest.split('/', 1)[0]
  return (f'{where} deform-attn projections' if nxt in _PROJ
          else f'{where} deform-attn sampling')


def stage_of(op_name: str, opcode: str = '') -> str:
  """The model stage of an HLO op, from its op_name scope path."""
  s = op_name
  bwd = 'transpose(' in s
  pre = 'bwd ' if bwd else ''
  if 'callback' in s or opcode == 'custom-call' and 'DDQDETR' not in s:
    return 'hungarian (scipy host callback)'
  if 'DDQDETR' not in s:
    if 'jvp(' in s or bwd:
      return pre + ('loss: while loops (jax hungarian)' if '/while' in s
                    else 'loss (criterion, match costs)')
    if not s:
      return 'unattributed'
    if not s.startswith('jit('):  # metadata = an argument's name
      return 'param-named ops (weight layout copies, optimizer)'
    return 'optimizer / other'
  if '/backbone/' in s:
    return pre + 'backbone'
  if '/neck/' in s:
    return pre + 'neck'
  if '/encoder/' in s:
    if '/self_attn/' in s:
      return pre + _attn_part(s.split('/self_attn/', 1)[1], 'encoder')
    return pre + 'encoder other (ffn, norms)'
  if '/decoder/' in s and '/bbox_head' not in s:
    if '/cross_attn/' in s:
      return pre + _attn_part(s.split('/cross_attn/', 1)[1], 'decoder')
    if '/self_attn/' in s:
      return pre + 'decoder self-attn'
    if '/while' in s:
      return pre + 'decoder NMS loop'
    if '/ffn/' in s or '/norms_' in s:
      return pre + 'decoder ffn, norms'
    return pre + 'decoder other (NMS IoU, masks, refs)'
  if 'bbox_head' in s:
    return pre + 'head branches'
  if any(k in s for k in ('select_distinct', 'training_queries',
                          'encoder_outputs', 'encoder_branches',
                          'dn_query_generator', 'query_map')):
    if '/while' in s:
      return pre + 'pre_decoder NMS loop'
    return pre + 'pre_decoder (proposals, top-k, dn)'
  if 'forward_encoder' in s:
    return pre + 'multiscale inputs (pos-enc, masks)'
  return pre + 'detector other (postprocess)'


def _short_scope(op_name: str) -> str:
  s = re.sub(r'^jit\([^)]*\)/', '', op_name)
  s = s.replace('DDQDETR/', '').replace('DDQDETR.', '')
  return s[-110:]


def group_scope(op_name: str) -> str:
  """The scope with layer / block indices folded, so the same op of every
  layer sums up: .../layers_3/... -> .../layers_*/..., layer2_1 -> layer2_*."""
  s = _short_scope(op_name)
  s = re.sub(r'layers_\d+', 'layers_*', s)
  s = re.sub(r'(layer\d)_\d+', r'\1_*', s)
  s = re.sub(r'(branches)_\d+', r'\1_*', s)
  return re.sub(r'\[\\?\'[^\]]*\]', '[..]', s) if not op_name.startswith(
      'jit(') else s


def _trace_events(trace_dir: str) -> list[dict]:
  files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                    recursive=True) or glob.glob(
                        os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                        recursive=True)
  if not files:
    return []
  with gzip.open(sorted(files)[-1]) as f:
    tr = json.load(f)
  ev = tr['traceEvents'] if isinstance(tr, dict) else tr
  return [e for e in ev if e.get('ph') == 'X' and 'dur' in e]


def self_times(events: list[dict], names: set) -> dict[str, float]:
  """{instruction: exclusive microseconds}: per thread, an event's duration
  minus that of the instruction events nested in it."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if e['name'] in names:
      by_thread[(e.get('pid'), e.get('tid'))].append(e)
  out = collections.defaultdict(float)
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e['ts'], -e['dur']))
    stack = []  # [end, name, child_time]
    def pop():
      end, name, child, dur = stack.pop()
      out[name] += max(0.0, dur - child)
      if stack:
        stack[-1][2] += dur
    for e in evs:
      ts, dur = float(e['ts']), float(e['dur'])
      while stack and ts >= stack[-1][0] - 1e-3:
        pop()
      stack.append([ts + dur, e['name'], 0.0, dur])
    while stack:
      pop()
  return dict(out)


def hot_spots(run_once, hlo_text: str, *, steps: int = 1, top: int = 8,
              trace_dir: str | None = None) -> dict:
  """Profiles ``run_once()`` ``steps`` times; hot ops and stage totals."""
  tmp = trace_dir or tempfile.mkdtemp(prefix='ddq_prof_')
  if trace_dir:
    os.makedirs(trace_dir, exist_ok=True)
    with open(os.path.join(trace_dir, 'compiled_hlo.txt'), 'w') as f:
      f.write(hlo_text)
  with jax.profiler.trace(tmp, create_perfetto_trace=True):
    for _ in range(steps):
      run_once()
  return analyze(tmp, hlo_text, steps=steps, top=top)


def analyze(trace_dir: str, hlo_text: str | None = None, *, steps: int = 1,
            top: int = 8) -> dict:
  """Hot ops, op groups and stages of a saved trace (``--trace-dir``; the
  HLO text defaults to ``trace_dir/compiled_hlo.txt``)."""
  if hlo_text is None:
    with open(os.path.join(trace_dir, 'compiled_hlo.txt')) as f:
      hlo_text = f.read()
  instrs = hlo_instructions(hlo_text)
  events = _trace_events(trace_dir)
  times = self_times(events, set(instrs))
  total = sum(times.values())
  if not total:
    return dict(hot_ops=[], stages={}, profile_note='no op events in trace')
  ops = sorted(times.items(), key=lambda kv: -kv[1])
  hot = []
  for name, us in ops[:top]:
    opcode, op_name = instrs[name]
    hot.append(dict(op=name, opcode=opcode, ms=round(us / steps / 1e3, 2),
                    share=round(us / total, 4), stage=stage_of(op_name, opcode),
                    scope=_short_scope(op_name)))
  groups = collections.defaultdict(float)
  for name, us in ops:
    opcode, op_name = instrs[name]
    groups[(stage_of(op_name, opcode), group_scope(op_name))] += us
  hot_groups = [dict(stage=st, scope=sc, ms=round(us / steps / 1e3, 2),
                     share=round(us / total, 4))
                for (st, sc), us in sorted(groups.items(),
                                           key=lambda kv: -kv[1])[:top]]
  stages = collections.defaultdict(float)
  for name, us in ops:
    opcode, op_name = instrs[name]
    stages[stage_of(op_name, opcode)] += us
  stages = {k: dict(ms=round(v / steps / 1e3, 2), share=round(v / total, 4))
            for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
  return dict(hot_ops=hot, hot_groups=hot_groups, stages=stages,
              op_time_ms_per_step=round(total / steps / 1e3, 2),
              profiled_steps=steps)


# ------------------------------------------------------------- the steps
