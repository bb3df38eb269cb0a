"""Graph passes on the ONNX model jax2onnx writes, so that onnxruntime runs
it exactly and loads it cleanly (``ddq_jax.serve.export`` applies ``fix_graph``).
Each pass keeps the values every node computes."""
from __future__ import annotations

import numpy as np


def fix_graph(graph) -> dict:
  """All passes on ``graph`` (and its subgraphs), in order; returns
  {pass: count}."""
  return dict(bool_where=_bool_where_as_logic(graph),
              identities=_drop_identities(graph),
              duplicate_outputs=_unique_outputs(graph),
              unused_initializers=_drop_unused_initializers(graph),
              broadcast_constants=_broadcast_constants(graph))


def _subgraphs(node):
  import onnx  # optional: ddq-jax[export]
  return [a.g for a in node.attribute
          if a.type == onnx.AttributeProto.GRAPH]


def _elem_types(graph, outer: dict) -> dict:
  types = dict(outer)
  for v in list(graph.input) + list(graph.value_info) + list(graph.output):
    if v.type.HasField('tensor_type'):
      types[v.name] = v.type.tensor_type.elem_type
  for x in graph.initializer:
    types[x.name] = x.data_type
  return types


def _bool_where_as_logic(graph, outer: dict | None = None) -> int:
  """Where(c, x, y) on bool x, y (no CPU kernel in onnxruntime) ->
  Or(And(c, x), And(Not(c), y)); every subgraph too.  Returns the count."""
  from onnx import TensorProto, helper  # optional: ddq-jax[export]
  types = _elem_types(graph, outer or {})
  nodes, count = [], 0
  for n in graph.node:
    for g in _subgraphs(n):
      count += _bool_where_as_logic(g, types)
    if n.op_type == 'Where' and TensorProto.BOOL in (
        types.get(n.input[1]), types.get(n.input[2])):
      c, x, y = n.input
      p = n.name or n.output[0]
      nodes += [helper.make_node('And', [c, x], [p + '_t']),
                helper.make_node('Not', [c], [p + '_nc']),
                helper.make_node('And', [p + '_nc', y], [p + '_f']),
                helper.make_node('Or', [p + '_t', p + '_f'],
                                 [n.output[0]])]
      count += 1
    else:
      nodes.append(n)
  del graph.node[:]
  graph.node.extend(nodes)
  return count


def _rename_inputs(graph, mapping: dict) -> None:
  for n in graph.node:
    for i, x in enumerate(n.input):
      if x in mapping:
        n.input[i] = mapping[x]
    for g in _subgraphs(n):
      _rename_inputs(g, mapping)


def _drop_identities(graph) -> int:
  """Removes Identity nodes (consumers read the source; onnxruntime's
  optimiser otherwise loses some Identity-of-initializer values)."""
  outputs = {o.name for o in graph.output}
  mapping, nodes, count = {}, [], 0
  for n in graph.node:
    for g in _subgraphs(n):
      count += _drop_identities(g)
    if n.op_type == 'Identity' and n.output[0] not in outputs:
      mapping[n.output[0]] = mapping.get(n.input[0], n.input[0])
    else:
      nodes.append(n)
  del graph.node[:]
  graph.node.extend(nodes)
  _rename_inputs(graph, mapping)
  return count + len(mapping)


def _unique_outputs(graph) -> int:
  """Gives every repeated output of a graph (and of every subgraph) its own
  Identity: jax2onnx writes a branch that returns one value twice (the
  decoder's ``cond`` returns its head mask as the next candidates and as
  the recorded mask) as an If branch listing one name twice, and
  onnxruntime then fills the second If output with garbage inside a
  Loop.  Returns the count."""
  from onnx import helper  # optional: ddq-jax[export]
  count = 0
  for n in graph.node:
    for g in _subgraphs(n):
      count += _unique_outputs(g)
  seen = set()
  for i, out in enumerate(graph.output):
    if out.name in seen:
      name = f'{out.name}_dup{i}'
      graph.node.append(helper.make_node('Identity', [out.name], [name]))
      out.name = name
      count += 1
    seen.add(out.name)
  return count


def _used_names(graph) -> set:
  """Names read by ``graph``'s nodes, its subgraphs' nodes (outer-scope
  reads) and its outputs."""
  used = {o.name for o in graph.output}
  for n in graph.node:
    used.update(n.input)
    for g in _subgraphs(n):
      used |= _used_names(g)
  return used


def _drop_unused_initializers(graph) -> int:
  """Removes initializers nothing reads (jax2onnx leaves constants of
  folded subexpressions behind; onnxruntime warns about each on load)."""
  count = 0
  for n in graph.node:
    for g in _subgraphs(n):
      count += _drop_unused_initializers(g)
  used = _used_names(graph)
  keep = [x for x in graph.initializer if x.name in used]
  if len(keep) < len(graph.initializer):
    count += len(graph.initializer) - len(keep)
    del graph.initializer[:]
    graph.initializer.extend(keep)
  return count


def _broadcast_constants(graph, min_size: int = 4096) -> int:
  """Initializers that repeat along some axes (jax2onnx folds broadcasts of
  constants: the normalisation mean over the whole canvas, zeros) become
  the one slice they repeat and an Expand to the full shape: the same
  values, a smaller file.  Returns the count."""
  from onnx import helper, numpy_helper  # optional: ddq-jax[export]
  count = 0
  for n in graph.node:
    for g in _subgraphs(n):
      count += _broadcast_constants(g, min_size)
  keep, nodes = [], []
  for x in graph.initializer:
    if int(np.prod(x.dims, dtype=np.int64)) < min_size:
      keep.append(x)
      continue
    a = numpy_helper.to_array(x)
    small = a
    for axis in range(a.ndim):
      first = small.take([0], axis=axis)
      if small.shape[axis] > 1 and (small == first).all():
        small = first
    if small.size * 4 > a.size:
      keep.append(x)
      continue
    keep.append(numpy_helper.from_array(small, x.name + '_slice'))
    keep.append(numpy_helper.from_array(
        np.asarray(a.shape, np.int64), x.name + '_shape'))
    nodes.append(helper.make_node(
        'Expand', [x.name + '_slice', x.name + '_shape'], [x.name]))
    count += 1
  if nodes:
    del graph.initializer[:]
    graph.initializer.extend(keep)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
  return count
