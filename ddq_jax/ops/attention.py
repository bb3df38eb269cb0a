"""Masked softmax attention per head: whole, or in query blocks.

``attention(q, k, v, mask=..., query_block=0)`` is torch's
``F.multi_head_attention_forward`` core (dropout 0): per head
softmax(q k^T) v, with blocked entries set to ``finfo.min`` before the
softmax (a fully blocked row stays finite: uniform weights).

``query_block = 0``: the plain formulation, differentiated by JAX; the
backward reads the stored (B, H, Q, K) probabilities.

``query_block > 0``: the queries in blocks of about that many, one block
at a time (a ``scan``), with a custom VJP that recomputes each block's
probabilities in the backward instead of storing them (as FlashAttention
does, with the whole key axis per block), and uses
``rowsum(dO * O)`` for the softmax's ``rowsum(dP * P)``.  Each block's
(B, H, T, K) logits, probabilities and gradients stay small enough to be
reused from cache: on XLA:CPU the decoder self-attention of the R50 step
(B=1, 8 heads, Q=K=2,450, 32 channels) runs forward and backward in about
half the time, and no probabilities are kept for the backward.  Values
equal the plain formulation's up to float32 rounding (the key and value
gradients are sums over blocks).  ``ddq_jax.backend.attention_query_block``
chooses.

``segments``: static (start, stop) ranges that tile the queries (= the
keys: self-attention) such that the mask blocks every query from every key
of another segment, as in DDQ's decoder, where the dense queries and the
rest never see each other.  Each segment is then computed alone, over its
own keys: (sum of |S|^2) / Q^2 of the work (R50 training: 1,100^2 +
1,350^2 of 2,450^2, about half).  The blocked cross entries contribute
exact zeros to the plain formulation's sums, so the values agree up to
float32 summation order, except for a row whose keys are all blocked
(uniform weights over its segment instead of over all keys).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp


def _probabilities(q, k, mask):
  """q (B, T, H, D), k (B, K, H, D), mask (B, T, K) bool or None ->
  (B, H, T, K) softmax weights."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  if mask is not None:
    logits = jnp.where(mask[:, None], jnp.finfo(logits.dtype).min, logits)
  return jax.nn.softmax(logits, axis=-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              mask: jax.Array | None, query_block: int = 0,
              segments: Sequence[tuple[int, int]] = ()) -> jax.Array:
  """Softmax attention of every head.

  Args:
    q: (B, Q, H, D) queries, already scaled (torch: by 1 / sqrt(D)).
    k, v: (B, K, H, D) keys and values.
    mask: (B, Q, K) or (Q, K) bool, True = blocked (every head); or None.
    query_block: 0 = all queries at once; > 0 = blocks of about this many
      queries, probabilities recomputed in the backward (module docstring).
    segments: () = one; else static (start, stop) ranges tiling [0, Q),
      Q = K, none of whose queries sees another's keys (module docstring).
  Returns:
    (B, Q, H, D).
  """
  if mask is not None and mask.ndim == 2:
    mask = jnp.broadcast_to(mask, (q.shape[0],) + mask.shape)
  if len(segments) > 1:
    _check_segments(segments, q.shape[1], k.shape[1])
    return jnp.concatenate([
        attention(q[:, s:e], k[:, s:e], v[:, s:e],
                  mask=None if mask is None else mask[:, s:e, s:e],
                  query_block=query_block)
        for s, e in segments], axis=1)
  nq = q.shape[1]
  if query_block <= 0:
    return jnp.einsum('bhqk,bkhd->bqhd', _probabilities(q, k, mask), v)
  blocks = -(-nq // query_block)
  size = -(-nq // blocks)
  if mask is None:
    mask = jnp.zeros((q.shape[0], nq, k.shape[1]), bool)
  return _blocked(q, k, v, mask, size)[:, :nq]


def _check_segments(segments, nq: int, nk: int) -> None:
  """Raises unless ``segments`` tile [0, nq) in order and nq == nk."""
  if nq != nk:
    raise ValueError(f'segments need self-attention: {nq} queries, {nk} keys')
  stops = [0] + [int(e) for _, e in segments]
  if ([int(s) for s, _ in segments] != stops[:-1] or stops[-1] != nq
      or any(e <= s for s, e in zip(stops, stops[1:]))):
    raise ValueError(f'segments {tuple(segments)} do not tile [0, {nq})')


def _to_blocks(x, size, pad_value):
  """(B, Q, ...) -> (Q' / size, B, size, ...), Q padded to Q'."""
  nq = x.shape[1]
  pad = -nq % size
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    x = jnp.pad(x, widths, constant_values=pad_value)
  x = x.reshape((x.shape[0], x.shape[1] // size, size) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_blocks(x):
  """(nb, B, size, ...) -> (B, nb * size, ...)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q, k, v, mask, size):
  """(B, Q', H, D) output, Q' = Q rounded up to blocks of ``size``; padded
  queries are fully blocked rows."""
  return _blocked_fwd(q, k, v, mask, size)[0]


def _blocked_fwd(q, k, v, mask, size):
  def block(args):
    qb, mb = args
    return jnp.einsum('bhqk,bkhd->bqhd', _probabilities(qb, k, mb), v)
  out = _from_blocks(jax.lax.map(
      block, (_to_blocks(q, size, 0), _to_blocks(mask, size, True))))
  return out, (q, k, v, mask, out)


def _blocked_bwd(size, res, d_out):
  q, k, v, mask, out = res
  nq = q.shape[1]
  # rowsum(dP * P) over the keys = rowsum(dO * O) over the channels.
  d_sum = jnp.einsum('bqhd,bqhd->bqh', d_out, out)

  def block(carry, args):
    dk, dv = carry
    qb, mb, dob, db = args
    p = _probabilities(qb, k, mb)
    dv = dv + jnp.einsum('bhqk,bqhd->bkhd', p, dob).astype(dv.dtype)
    dp = jnp.einsum('bqhd,bkhd->bhqk', dob, v)
    ds = p * (dp - jnp.moveaxis(db, 1, 2)[..., None])
    ds = jnp.where(mb[:, None], 0.0, ds)
    dk = dk + jnp.einsum('bhqk,bqhd->bkhd', ds, qb).astype(dk.dtype)
    return (dk, dv), jnp.einsum('bhqk,bkhd->bqhd', ds, k)

  # The key and value gradients are sums over blocks: kept in float32.
  acc = jnp.promote_types(k.dtype, jnp.float32)
  (dk, dv), dq = jax.lax.scan(
      block, (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc)),
      (_to_blocks(q, size, 0), _to_blocks(mask, size, True),
       jnp.moveaxis(d_out.reshape(d_out.shape[0], -1, size,
                                  *d_out.shape[2:]), 1, 0),
       jnp.moveaxis(d_sum.reshape(d_sum.shape[0], -1, size,
                                  d_sum.shape[2]), 1, 0)))
  return (_from_blocks(dq)[:, :nq], dk.astype(k.dtype), dv.astype(v.dtype),
          None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
