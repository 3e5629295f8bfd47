"""LoLA's sparse cache (McDermott et al. 2025, arXiv 2505.23666): exact pairs the
linear state would recall badly.

A window + linear hybrid forgets a key's exact value once it leaves the window:
the linear state (S, z) superimposes it on every other key ("memory collisions"),
and LoLCATs-style conversions score 0.6% on single-needle retrieval at 4k. LoLA
keeps, beside the W-token window and (S, z), up to lambda exact (k, v) pairs per
kv head, chosen by how badly the state would recall them:

    SRE(k, v) = || phi(k)^T S / phi(k)^T z - v ||^2,

with (S, z) the state that excludes the cached pairs and the candidates (phi the
key feature map; an empty state predicts 0). The candidates are the cache plus the
keys just evicted from the window; the top lambda by SRE stay (``jax.lax.top_k``, so
shapes are static and prefill and decode compile once), the rest are folded into (S, z).
Under grouped-query attention a pair serves its group's query heads, each with its own
feature map and state: its error is the sum of theirs, and the cache holds kv heads, as
a KV cache does (a third of the memory in SmolLM2, 9 heads on 3). Queries score the
cache exactly, exp(q.k / sqrt(d)) with the window's gain (the pairs are evicted window
keys), under the one normaliser of ``window.hybrid``; the state is window + sinks +
lambda pairs per kv head + (S, z) per query head, whatever the length.

The update schedule, which every pass shares so that they agree:

* a prefill call runs in chunks of ``chunk_size`` tokens (and a last, shorter one);
  each chunk's queries see the cache as it was at the chunk's start and a linear
  part holding every other key out of their window (the state at the chunk's start
  plus the keys evicted within the chunk so far), and the cache is updated once, at
  the chunk's end, from the cache and the keys that left the ring in the chunk (each
  row's valid keys older than its last W, ``window.ring_append``);
* a decoding step is a chunk of one valid token (a masked token still takes a ring
  slot, as it takes a position in the forward pass's window);
* the training / evaluation forward pass (``__call__``) *is* such a prefill, from an
  empty state: forward == prefill == decode whenever the chunks coincide (a chunked
  or multi-turn prefill whose turns are multiples of ``chunk_size``; decoding after
  a prefill equals a forward pass with ``chunk_size=1``). Gradients flow through the
  kept pairs' keys and values, not through the choice. The chunks run in order
  (a ``lax.scan``), so the forward pass is causal only, takes no packed segments
  and no ``mesh.seq`` split: each raises a ValueError.

LoLA itself needs no retraining: a trained hybrid can add the cache at evaluation
time (``attention.sparse_cache`` with the same checkpoint).

Leaving one out (``attention.sparse_cache_leave_one_out``): LoLA's state excludes the
cached pairs, so a phrase repeated through the context (a filler line, a boilerplate
header) is recalled by nothing while its copies are cached; every copy keeps a high
error, and over a long enough context the copies of one token fill a head's cache,
the pairs that matter pushed out and the copies' summed exact mass drowning them at
read-out. Scored instead against the state plus every other candidate (as if all were
folded, each pair's own term taken out: one extra ``linear.add_keys`` per update),
copies recall each other and score below pairs that nothing else recalls; how far they
fall depends on how selective the feature map is (exact copies under one-hot features:
one stays).

Storage (``attention.sparse_cache_dtype``): keys and values may be kept in bfloat16,
twice the pairs in the same memory. Only storage: reads and the self-recall errors are
computed in float32, and a key just evicted is scored at full precision before it is
rounded for keeping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from performer.attention import linear
from performer.attention import rope_clamp as rope_clamp_lib
from performer.attention.linear import NEG

sg = jax.lax.stop_gradient

STORAGE_DTYPES = ('', 'float32', 'bfloat16', 'float16')


def storage_dtype(name, state_dtype):
  """The dtype the cache's keys and values are kept in ('' : the state's)."""
  return jnp.dtype(name) if name else state_dtype


def init(
  batch, size, heads, head_dim, value_dim, dtype=jnp.float32, linear_keys=False, indexed=False
):
  """The empty cache: slot j of kv head h holds one pair, valid per head; ``linear_keys``:
  each key also as the feature map sees it ('k_linear', ``attention.linear_nope``);
  ``indexed``: its index in the row ('index', ``attention.linear_half_life``)."""
  cache = {
    'k': jnp.zeros((batch, size, heads, head_dim), dtype),
    'v': jnp.zeros((batch, size, heads, value_dim), dtype),
    'valid': jnp.zeros((batch, size, heads), bool),
  }
  if linear_keys:
    cache['k_linear'] = jnp.zeros_like(cache['k'])
  if indexed:
    cache['index'] = jnp.zeros((batch, size, heads), jnp.int32)
  return cache


def read(cache, q, far=None, rope_clamp=0):
  """Exact part of queries q [B, L, H, d] over the cache (every pair is older than
  every query): (num [B, H, L, D], den [B, H, L], shift [B, H, L]). ``far`` ({'q',
  'index'}, ``rope_clamp.py``): a pair ``rope_clamp`` or more valid tokens before its
  query is scored from its unrotated key ('k_linear') and its 'index'."""
  scale, clamped = q.shape[-1] ** -0.5, {}
  if far is not None:
    clamped = dict(
      far_k=cache['k_linear'],
      query_index=far['index'][:, None, :, None],  # [B, 1, L, 1]
      key_index=jnp.swapaxes(cache['index'], 1, 2)[:, :, None, :],  # [B, H, 1, lambda]
    )
  far_q = None if far is None else far['q']
  s = rope_clamp_lib.scores('blhd,bjhd->bhlj', q, cache['k'], far_q, clamp=rope_clamp, **clamped)
  valid = jnp.swapaxes(cache['valid'], 1, 2)[:, :, None, :]  # [B, H, 1, lambda]
  s = jnp.where(valid, s * scale, NEG)
  shift = sg(jnp.max(s, axis=-1))
  weights = jnp.where(valid, linear.safe_exp(s - shift[..., None]), 0.0)
  num = jnp.einsum('bhlj,bjhd->bhld', weights, cache['v'].astype(jnp.float32))
  return num, jnp.sum(weights, axis=-1), shift


def self_recall_error(state, kf, v, kr=None):
  """SRE [B, H, N] of pairs (kf [B, H, N, M], v [B, H, N, D]) against the linear state:
  how far its read-out for the key is from the value. S and z share the scale
  exp(-M) and phi(k) = kf exp(r), so the ratio needs kf only. With ``kr`` [B, H, N]
  (NEG: not held), ``state`` holds the pairs themselves: each one's own term,
  (kf . kf) exp(kr - M) v, is taken out (leave one out)."""
  num = jnp.einsum('bhnm,bhmd->bhnd', kf, state['S'])
  den = jnp.einsum('bhnm,bhm->bhn', kf, state['z'])
  some = den != 0
  if kr is not None:  # what is left of den once a pair's own term is out may be rounding
    own = jnp.sum(kf * kf, axis=-1) * linear.safe_exp(kr - state['M'][..., None])
    num, den = num - own[..., None] * v, den - own
    some = den > 1e-6 * jnp.max(jnp.abs(den), axis=-1, keepdims=True)
  predicted = jnp.where(some[..., None], num / jnp.where(some, den, 1.0)[..., None], 0.0)
  return jnp.sum(jnp.square(predicted - v), axis=-1)


def update(cache, state, candidates, kf, kr, leave_one_out=False):
  """(new cache, new linear state) from N ``candidates``, the cache's own pairs and the
  keys just evicted from the window: {'k' [B, N, K, d], 'v' [B, N, K, D], 'valid'
  [B, N, K][, 'k_linear']} with K kv heads, and their key features kf [B, H, N, M],
  kr [B, H, N] for each of the H = G K query heads (each its own feature map and
  state). ``state`` excludes every candidate. A pair is shared by its group's G query
  heads (the cache holds kv heads, as a KV cache does), so its error is the sum of
  theirs; the top lambda per kv head stay exact, the other valid ones join the state
  of every head in the group. With ``leave_one_out``
  (``attention.sparse_cache_leave_one_out``) a pair is scored against ``state`` plus
  every other valid candidate, as if they were all folded: near-copies of one pair (a
  repeated phrase) then recall each other and do not all stay exact."""
  size, kv_heads = cache['valid'].shape[1:]
  heads = kf.shape[1]
  to_heads = lambda x: jnp.repeat(x, heads // kv_heads, axis=1)  # [B, K, ...] -> [B, H, ...]
  v_kv = jnp.swapaxes(candidates['v'], 1, 2).astype(jnp.float32)  # [B, K, N, D]
  valid = jnp.swapaxes(candidates['valid'], 1, 2)  # [B, K, N]
  if leave_one_out:
    held = jnp.where(to_heads(valid), kr, NEG)
    everything = linear.add_keys(state, kf * to_heads(valid)[..., None], held, to_heads(v_kv))
    error = sg(self_recall_error(everything, kf, to_heads(v_kv), held))  # [B, H, N]
  else:
    error = sg(self_recall_error(state, kf, to_heads(v_kv)))
  error = jnp.sum(error.reshape(error.shape[:1] + (kv_heads, -1) + error.shape[2:]), axis=2)
  _, top = jax.lax.top_k(jnp.where(valid, error, -1.0), size)  # [B, K, lambda]
  kept = jnp.any(top[..., None] == jnp.arange(v_kv.shape[2]), axis=-2)  # [B, K, N]
  fold = to_heads(valid & ~kept)
  state = linear.add_keys(state, kf * fold[..., None], jnp.where(fold, kr, NEG), to_heads(v_kv))

  def take(x):  # [B, N, K, ...] -> the kept [B, lambda, K, ...]
    heads_first = jnp.swapaxes(x, 1, 2)
    index = top.reshape(top.shape + (1,) * (x.ndim - 3))
    return jnp.swapaxes(jnp.take_along_axis(heads_first, index, axis=2), 1, 2)

  return {name: take(x).astype(cache[name].dtype) for name, x in candidates.items()}, state
