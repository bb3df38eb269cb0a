"""The ONNX artifact: ``serve.detect``'s program through jax2onnx, run per
image inside one ONNX Loop over the batch axis.

The batch axis may be symbolic (``jax.export.symbolic_shape``; ONNX
``dim_param`` 'batch') or a fixed N.  The loop's body is the program at
batch 1 with static shapes: jax2onnx 0.17.1 cannot lower every primitive
on a symbolic dimension (``lax.pad`` and ``lax.rem`` stamp shapes through
``int()``), and a per-image body also keeps the vmapped NMS while loops out
of the graph.  Padding invariance (``serve.detect.inference_config``) makes
an image's detections independent of its batch mates, so the loop gives
what the batched program gives.  ``onnx_graph.fix_graph`` then makes
onnxruntime run the graph exactly and load it cleanly.

Needs the optional tools (jax2onnx pins an older orbax-checkpoint than
training uses, so it is installed without its dependencies): ONNX_INSTALL.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Sequence

import jax

from ddq_jax.ops.nms import auto_method
from ddq_jax.serve.onnx_graph import fix_graph

INPUT_NAMES = ('images', 'image_sizes', 'scale_factors')
OUTPUT_NAMES = ('boxes', 'scores', 'labels')
# The ONNX graph runs the NMS as a while loop of dense (N, N) steps (a
# fori_loop has no lowering in jax2onnx).
ONNX_NMS_METHOD = 'fixed_point'
# The one install that makes --format onnx|both work (see pyproject.toml).
ONNX_INSTALL = ('pip install "ddq-jax[export]" && pip install --no-deps '
                '"jax2onnx==0.17.1"')
# onnx_ir logs one warning per value whose type jax2onnx left unset (loop
# bookkeeping scalars); the values are typed again by shape inference.
_QUIET_LOGGERS = ('onnx_ir.serde',)


def check_onnx_tools() -> None:
  """ImportError naming ``ONNX_INSTALL`` when jax2onnx / onnx are absent."""
  missing = []
  for module in ('onnx', 'jax2onnx'):
    try:
      __import__(module)
    except ImportError:
      missing.append(module)
  if missing:
    raise ImportError(f'ONNX export (--format onnx|both) needs '
                      f'{" and ".join(missing)}: {ONNX_INSTALL}; or pass '
                      '--format jax')


def per_image(serve: Callable) -> Callable:
  """``serve`` (batched (images, image_sizes, scale_factors) -> (boxes,
  scores, labels)) as a ``lax.map`` of itself at batch 1: the same
  signature and shapes, one image at a time."""
  def one(args):
    return tuple(x[0] for x in serve(*(a[None] for a in args)))

  def mapped(images, image_sizes, scale_factors):
    return jax.lax.map(one, (images, image_sizes, scale_factors))

  return mapped


@contextlib.contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
  loggers = [logging.getLogger(n) for n in names]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _dim(proto, value) -> None:
  """Sets one TensorShapeProto dim to an int or a symbolic name."""
  proto.Clear()
  if isinstance(value, int):
    proto.dim_value = value
  else:
    proto.dim_param = str(value)


def set_io_shapes(graph, in_shapes, out_shapes) -> None:
  """The graph's inputs and outputs get exactly these shapes (ints or
  names, e.g. 'batch'): jax2onnx stamps a loop's stacked outputs with a
  sentinel name or a wrong size, which onnxruntime warns about on every
  run."""
  for values, shapes in ((graph.input, in_shapes),
                         (graph.output, out_shapes)):
    for v, shape in zip(values, shapes):
      dims = v.type.tensor_type.shape.dim
      del dims[:]
      for d in shape:
        _dim(dims.add(), d)


def export_onnx(serve: Callable, specs, path: str, *, batch_name: str,
                out_shapes) -> dict:
  """Writes ``path``: ``per_image(serve)`` through jax2onnx, then
  ``fix_graph``.  ``specs``: ShapeDtypeStructs of the inputs (the batch
  dimension an int or a ``jax.export`` symbolic dimension named
  ``batch_name``); ``out_shapes``: the outputs' shapes (ints and
  ``batch_name``).  Returns {'ops': {op_type: count}, 'onnx_fixes',
  'opset', 'largest_initializers'}."""
  try:
    from jax2onnx import to_onnx  # optional: ddq-jax[export]
    import onnx  # optional: ddq-jax[export]
  except ImportError as e:
    raise ImportError(f'ONNX export needs jax2onnx and onnx: {ONNX_INSTALL}'
                      ) from e
  # Trace with plain JAX first: the converter then sees lax primitives only,
  # not its patched jnp / flax functions.  (A fresh function: jax caches
  # traces by function, and an earlier export of ``serve`` traced the
  # default NMS method.)
  mapped = per_image(serve)
  with auto_method(ONNX_NMS_METHOD):
    closed = jax.make_jaxpr(lambda *a: mapped(*a))(*specs)

  def replay(*args):
    return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)

  with _quiet(_QUIET_LOGGERS):
    model = to_onnx(replay, list(specs), model_name='ddq_detr',
                    input_names=list(INPUT_NAMES),
                    output_names=list(OUTPUT_NAMES))
  in_shapes = [tuple(d if isinstance(d, int) else batch_name
                     for d in s.shape) for s in specs]
  set_io_shapes(model.graph, in_shapes, out_shapes)
  model = onnx.shape_inference.infer_shapes(model)
  fixes = fix_graph(model.graph)
  onnx.save(model, path)
  ops: dict[str, int] = {}
  _count_ops(model.graph, ops)
  return {'ops': dict(sorted(ops.items(), key=lambda kv: -kv[1])),
          'onnx_fixes': fixes,
          'opset': [dict(domain=o.domain, version=o.version)
                    for o in model.opset_import],
          'largest_initializers': largest_initializers(model.graph)}


def _subgraphs(node) -> list:
  return [a.g for a in node.attribute if a.HasField('g')]


def _count_ops(graph, ops: dict) -> None:
  """Node counts by op type over ``graph`` and its subgraphs."""
  for node in graph.node:
    ops[node.op_type] = ops.get(node.op_type, 0) + 1
    for g in _subgraphs(node):
      _count_ops(g, ops)


def largest_initializers(graph, n: int = 5) -> list:
  """[(name, dims, bytes)] of the ``n`` largest initializers of ``graph``
  and its subgraphs, largest first."""
  found = []

  def walk(g):
    for x in g.initializer:
      found.append((x.name, list(x.dims), len(x.raw_data)
                    or x.ByteSize()))
    for node in g.node:
      for sub in _subgraphs(node):
        walk(sub)

  walk(graph)
  return sorted(found, key=lambda t: -t[2])[:n]
