"""Collectives and host callbacks of an optimised HLO module (its text).

Counted statically: an instruction inside a ``while`` body counts once,
however many trips the loop makes.  Bytes are the collective's result per
chip (an all-gather's gathered array, a reduce-scatter's scattered piece,
an all-reduce's reduced array).  An asynchronous pair (``all-gather-start``
/ ``all-gather-done``) counts once, at its ``-done``, whose result is the
collective's; ops wrapped in ``async-start`` computations are counted where
they appear inside the wrapped computation.
"""
from __future__ import annotations

import re

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute', 'collective-broadcast', 'ragged-all-to-all')

_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1,
          'f8e5m2': 1, 'f8e4m3': 1, 'f8e4m3fnuz': 1, 'f8e5m2fnuz': 1,
          's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
          'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
# "%name = <type> <opcode>(" ; the type is an array shape or a tuple of them.
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\(.*?\)|\S+)\s+'
                    r'([a-z][a-z0-9\-]*)\(')
_SHAPE = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_CALLBACK = re.compile(r'custom_call_target="([^"]*callback[^"]*)"')


def shape_bytes(type_text: str) -> int:
  """Bytes of an HLO type (``f32[2,3]{1,0}`` or a tuple of such)."""
  total = 0
  for dtype, dims in _SHAPE.findall(type_text):
    size = _BYTES.get(dtype)
    if size is None:
      continue
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * size
  return total


def collective_kind(opcode: str) -> str | None:
  """'all-gather' for all-gather / all-gather-done; None for the -start half
  of an async pair and for anything that is not a collective."""
  if opcode.endswith('-start'):
    return None
  base = opcode[:-len('-done')] if opcode.endswith('-done') else opcode
  return base if base in COLLECTIVES else None


def collectives(hlo_text: str) -> dict:
  """{kind: {'count': n, 'bytes': result bytes per chip}} of the module."""
  out: dict = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    kind = collective_kind(m.group(2))
    if kind is None:
      continue
    entry = out.setdefault(kind, {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += shape_bytes(m.group(1))
  return dict(sorted(out.items()))


def host_callbacks(hlo_text: str) -> int:
  """Host round trips: python callback custom-calls (CPU / GPU) plus sends to
  the host (TPU callbacks are send / recv pairs with is_host_transfer)."""
  n = 0
  for line in hlo_text.splitlines():
    if _CALLBACK.search(line):
      n += 1
    elif 'is_host_transfer=true' in line and _INSTR.match(line) and \
        _INSTR.match(line).group(2) == 'send':
      n += 1
  return n


def memory_figures(analysis) -> dict:
  """``compiled.memory_analysis()`` as the benchmark line's GB fields
  (peak = temp + arguments + outputs - aliased); {} when there is none."""
  if analysis is None:
    return {}
  gb = 2.0 ** 30
  m = analysis
  peak = (m.temp_size_in_bytes + m.argument_size_in_bytes +
          m.output_size_in_bytes - m.alias_size_in_bytes)
  return dict(peak_memory_gb=round(peak / gb, 3),
              temp_memory_gb=round(m.temp_size_in_bytes / gb, 3),
              argument_memory_gb=round(m.argument_size_in_bytes / gb, 3),
              output_memory_gb=round(m.output_size_in_bytes / gb, 3),
              alias_memory_gb=round(m.alias_size_in_bytes / gb, 3))
