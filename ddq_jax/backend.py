"""The platform the traced program is built for: the one place the model asks.

Formulations that only pay off on one backend are chosen from
``platform()``, never from ``jax.default_backend()`` directly:

* the sequential NMS on XLA:CPU, the fixed-point one elsewhere
  (``ops/nms.py``, ``method='auto'``);
* the scipy Hungarian solver behind a host callback for a one-device CPU
  step, the jax one elsewhere (``losses/hungarian.resolve_solver``);
* the decoder self-attention in query blocks with a recomputing backward
  on XLA:CPU (``attention_query_block``);
* LayerNorm's closed-form gradient on XLA:CPU (``layer_norm_own_vjp``);
* the decoder self-attention's projections one matmul per image on GPU
  (``per_image_attention_projections`` below);
* the deformable attention's queries sampled in blocks on TPU (memory)
  and on XLA:CPU (speed) (``deform_attn_query_chunks``);
* ResNet and neck convolutions' weight gradients by taps (im2col) on
  XLA:CPU in scanned blocks and for 1x1 kernels
  (``conv_weight_grad_by_taps``, ``model/conv.py``).

Workarounds that every backend shares (the same program everywhere), for
XLA's rewrites of rounding and fusion that parity on XLA:CPU needs
prevented, are the named helpers of ``ops/xla_cpu.py``.

Usually ``platform()`` is the default backend; a deviceless compile for a
TPU or GPU target (``ddq_jax.tools.accelerators``) traces on a
CPU-only host, so it wraps tracing in ``target_platform('tpu')`` and the
graph gets the formulation the target would get on its own host.

Tracing happens at ``jit(...).lower()`` (or the first call), so the context
must cover that, not the compile.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import jax

PLATFORMS = ('cpu', 'gpu', 'tpu')
_STACK: list[str] = []


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the innermost ``target_platform``, else the
  default backend (jax names CUDA and ROCm devices 'gpu')."""
  if _STACK:
    return _STACK[-1]
  name = jax.default_backend()
  return 'gpu' if name in ('cuda', 'rocm') else name


def is_cpu() -> bool:
  return platform() == 'cpu'


@contextlib.contextmanager
def target_platform(name: str) -> Iterator[None]:
  """Traces inside this context build the program for ``name``."""
  if name not in PLATFORMS:
    raise ValueError(f'platform {name!r}: expected one of {PLATFORMS}')
  _STACK.append(name)
  try:
    yield
  finally:
    _STACK.pop()



def per_image_attention_projections() -> bool:
  """The decoder self-attention's q/k/v and out projections as one matmul
  per image (GPU), else one matmul over every image's queries.  XLA:GPU
  fuses the heads <-> channels transposes into Triton GEMMs (the out
  projection's input, the q/k/v projections' input gradients) whose rows
  are (image, query) merged; when the query count is not a multiple of the
  row tile (R50: 2,450 queries; tiny: 115) no tiling exists and the compile
  fails (deviceless, where nothing is autotuned).  With the image as the
  dot's batch dimension the rows are the queries alone.  Elsewhere the
  plain matmul, bit for bit what CPU parity and the trajectory check were
  measured with."""
  return platform() == 'gpu'


# The decoder self-attention's query block on XLA:CPU (see below).
CPU_ATTENTION_QUERY_BLOCK = 128


def attention_query_block(num_queries: int) -> int:
  """Queries per block of the decoder self-attention (``ops/attention.py``):
  on XLA:CPU blocks of about 128 when there are more queries than that,
  else 0 (all at once, stored probabilities).  On the 2-core CPU host the
  R50 step's self-attention (8 heads, 2,450 queries, 32 channels per head)
  took 0.85-1.03 s per layer forward and backward at once and 0.40-0.46 s
  in blocks of 128 (forward alone 0.25 -> 0.12 s): each block's
  (B, 8, 128, 2,450) logits stay in cache.  A single block (the tiny
  configs' 115 queries) gains nothing, and GPU and TPU keep the plain
  formulation until measured there."""
  if platform() == 'cpu' and num_queries > CPU_ATTENTION_QUERY_BLOCK:
    return CPU_ATTENTION_QUERY_BLOCK
  return 0


def layer_norm_own_vjp() -> bool:
  """LayerNorm's closed-form gradient (``model/layer_norm.py``) on
  XLA:CPU, where JAX's derivative of flax's forward took about 4-5x as
  long (100 vs 20-25 ms per encoder norm of the R50 step); the derived
  gradient elsewhere."""
  return platform() == 'cpu'


# The deformable attention's query blocks on TPU, and the queries per
# block on XLA:CPU (see below).
TPU_DEFORM_ATTN_QUERY_CHUNKS = 8
CPU_DEFORM_ATTN_QUERY_BLOCK = 128


def deform_attn_query_chunks(num_queries: int) -> int:
  """Query blocks the deformable attention samples in sequence.

  TPU: 8.  On TPU v5e the R50 training step's peak was almost all (10.9
  of 11.3 GiB) the encoder's backward: the re-gathered samples
  (B * H * Q * L * P * 4 * Dh floats, 2.7 GiB at 2 images per chip), a
  copy of them relaid with the 64 samples per query as the minor
  dimension, padded to 128 lanes (5.5 GiB), and the scatter contributions
  (2.7 GiB), from the compiled buffer assignment.

  XLA:CPU: blocks of about 128 queries when there are more.  Writing the
  gathered samples is what the sampling costs there (an R50 encoder
  layer's are 1.46 GB, about what a plain copy of that size takes); in
  blocks they stay in cache.  Per R50 encoder layer on the 2-core host:
  forward 0.80 -> 0.52 s, forward and backward 1.8 -> 1.0 s.  The R50
  inference step went 7.4 -> 4.9 s (blocks of 32, 64 and 128 queries
  alike, 256: 5.6 s, 512: 6.0 s), the training step's compiled peak
  4.86 -> 2.57 GB (published plan) and 17.5 -> 7.5 GB (unrolled).  Each
  query's result is computed as unblocked and the value gradient's
  scatter adds in the same order, so the numbers are the unblocked ones
  (``tests/test_deform_attn.py``).

  GPU: 1 (all at once; no lane padding, and it fits)."""
  if platform() == 'tpu':
    return TPU_DEFORM_ATTN_QUERY_CHUNKS
  if platform() == 'cpu' and num_queries > CPU_DEFORM_ATTN_QUERY_BLOCK:
    return -(-num_queries // CPU_DEFORM_ATTN_QUERY_BLOCK)
  return 1


def conv_weight_grad_by_taps(*, kernel: int, in_loop: bool) -> bool:
  """A trainable ResNet convolution's weight gradient as one im2col matmul
  (``ops/conv.py``) on XLA:CPU: inside a loop (a scanned block), where
  XLA:CPU's own is ~30x slower, and for 1x1 kernels everywhere, which
  XLA:CPU differentiates as a convolution whose window is the whole map
  (R50 at 800x1344, outside loops: 98 -> 33 ms for 256 -> 64 channels at
  200x336, 331 -> 33 ms for the stride-2 256 -> 512 downsample; a 3x3
  kernel outside loops is faster with XLA's own, 62 against 222 ms).
  XLA's own convolution gradient elsewhere.  The ChannelMapper neck's 1x1
  convolutions too (``model/conv.py``): XLA:CPU laid their inputs
  (512-2,048 channels) out channels-first for the same whole-map
  convolution."""
  return platform() == 'cpu' and (in_loop or kernel == 1)


def conv_1x1_as_matmul() -> bool:
  """An unpadded 1x1 convolution (ResNet's conv1 / conv3 / downsample, the
  neck's input convolutions) as a matmul of the (strided) input with the
  (Cin, Cout) kernel on XLA:CPU (``ops/conv.py``), whose convolution took
  2.3x as long at the R50 backbone's widest maps (256 -> 64 channels at
  200x336: 87 against 38 ms; 64 -> 256: 55 against 35 ms; 512 -> 128 at
  100x168: 29 against 21 ms; equal numbers on this host).  XLA's
  convolution elsewhere."""
  return platform() == 'cpu'
