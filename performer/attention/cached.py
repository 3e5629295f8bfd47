"""The hybrid with LoLA's sparse cache: every pass is a chunked prefill.

The cache is updated once per chunk from the keys the chunk evicted
(``sparse_cache.py`` has the schedule), so the forward pass runs the chunks in order
from an empty state: forward == prefill == decode where the chunks coincide. Causal
only, one sequence a row, one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from performer.attention import context_parallel
from performer.attention.hybrid import HybridAttention
from performer.attention.layers import check_inputs


class SparseCacheAttention(HybridAttention):
  """A window hybrid with LoLA's sparse cache (``sparse_cache.py``): every pass,
  the forward one included, is a prefill in chunks of ``chunk_size`` run in order
  (a ``lax.scan``, then the remainder), the cache updated after each."""

  def _attend(self, q, k, v, *, causal, mask, segment_ids, linear_qk=None, far_q=None):
    """The forward pass: a prefill from an empty state."""
    if not causal:
      raise ValueError('attention.sparse_cache is a causal decoding cache: not bidirectional')
    if segment_ids is not None:
      raise ValueError(
        'attention.sparse_cache runs its chunks in order over one sequence: packed '
        'segment_ids are not supported'
      )
    lin = self._linear_pair(q, k, linear_qk)
    state = self.init_state(q.shape[0], v.shape[-1], num_kv_heads=k.shape[2], dtype=k.dtype)
    return self._prefill_chunks(state, q, k, v, lin, mask, far_q)[0]

  def prefill(self, state, q, k, v, *, mask=None, linear_qk=None, far_q=None):
    check_inputs(q, k, v, mask, None)
    lin = self._linear_pair(q, k, linear_qk)
    return self._prefill_chunks(state, q, k, v, lin, mask, far_q)

  def _scores(self, q, k, *, causal, mask, segment_ids, linear_qk=None):
    raise ValueError('weights(): a sparse cache depends on the update schedule, no matrix')

  def _prefill_chunks(self, state, q, k, v, lin, mask, far_q=None):
    """``_prefill_chunk`` over chunks of ``chunk_size`` in order."""
    if context_parallel.active():
      raise ValueError(
        'attention.sparse_cache runs its chunks in order on one device: no mesh.seq split'
      )
    b, length = q.shape[:2]
    ctx = self._calibrate(lin, causal=True, mask=mask)
    mask = jnp.ones((b, length), bool) if mask is None else mask
    c = min(self.options.chunk_size, length)
    n = length // c
    split = lambda x: jnp.moveaxis(x[:, : n * c].reshape((b, n, c) + x.shape[2:]), 1, 0)

    far_q = self._far_query(far_q)
    xs = (q, k, v, *lin, mask) + (() if far_q is None else (far_q,))

    def body(carry, xs):
      q, k, v, q_lin, k_lin, mask, *far_q = xs
      chunk = (q, k, v, (q_lin, k_lin), mask)
      out, carry = self._prefill_chunk(carry, *chunk, ctx=ctx, far_q=(far_q or [None])[0])
      return carry, out

    state, out = jax.lax.scan(body, state, tuple(split(x) for x in xs))
    outs = [jnp.moveaxis(out, 0, 1).reshape((b, n * c) + out.shape[3:])]
    if length > n * c:
      rest = lambda x: x[:, n * c :]
      chunk = (rest(q), rest(k), rest(v), (rest(lin[0]), rest(lin[1])), rest(mask))
      far_rest = None if far_q is None else rest(far_q)
      out, state = self._prefill_chunk(state, *chunk, ctx=ctx, far_q=far_rest)
      outs.append(out)
    return jnp.concatenate(outs, axis=1), state
