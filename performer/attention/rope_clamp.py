"""ReRoPE's clamp (Su 2023) for the exact keys that outlive the window
(``attention.rope_clamp = N``): a sink or a sparse cache's key more than N valid tokens
before its query is scored as if it were N tokens back.

Under rotary positions an exact score depends on the distance i - j, and a converted
model knows the distances of its pretraining context only. The window's keys are never
far, and the linear part sees keys before rotary positions (``linear_nope``); but the
sinks sit at the start of the stream and the cache keeps keys from anywhere behind the
window, so past the original's context their scores leave what the model has seen.
Clamping keeps them inside it: for i - j >= N,

    (R_i q) . (R_{i - N} k) = (R_N q) . k,

so a far score needs only the key before rotary positions, which the ring, the cache
and the sinks keep under ``linear_nope`` ('k_linear'), and the query rotated to N
(``far_q``, which the model's attention layer passes beside q), whatever i and j. With N
at least the original's context nothing changes inside it. Distances count valid tokens,
as the decay's indices do (``decay.row_index``); a packed segment counts from its start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from performer.attention import decay


def query_index(valid, segment_ids=None, start=None):
  """[B, L] int32: each token's index among the valid tokens of its segment, from
  ``start`` [B] (tokens a decoding state has seen, one segment) when given."""
  index = decay.row_index(valid, start)
  if segment_ids is None:
    return index
  first = jnp.concatenate(
    [jnp.ones_like(valid[:, :1]), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  before = jnp.cumsum(valid.astype(jnp.int32), axis=1) - valid  # valid tokens before each
  return index - jax.lax.cummax(jnp.where(first, before, 0), axis=1)


def select(near, far, query_index, key_index, clamp):
  """Logits: ``far`` (the query rotated to ``clamp`` against the unrotated key) where the
  key is at least ``clamp`` valid tokens before the query, else ``near``; the indices
  broadcast against the logits."""
  return jnp.where(query_index - key_index >= clamp, far, near)


def scores(spec, q, k, far=None, *, far_k=None, query_index=None, key_index=None, clamp=0):
  """Exact logits by einsum ``spec`` of q against k, in float32 and unscaled. With ``far``
  (the query rotated to ``clamp``) and ``far_k`` (the keys unrotated), a pair ``clamp``
  or more valid tokens apart (indices broadcast against the logits) takes far . far_k."""
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  near = jnp.einsum(spec, f32(q), f32(k))
  if far is None:
    return near
  return select(near, jnp.einsum(spec, f32(far), f32(far_k)), query_index, key_index, clamp)


def far_inputs(far_q, k_linear, index):
  """The ``far`` argument of the exact parts: {'q' [B, L, H, d] rotated to the clamp,
  'k' [B, L, H, d] unrotated, 'index' [B, L] from ``query_index``}."""
  return {'q': far_q, 'k': k_linear, 'index': index}
