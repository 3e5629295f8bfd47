"""Exact softmax attention: the fast path, the einsum reference, a KV cache.

The fast path is ``jax.nn.dot_product_attention`` (cuDNN flash attention on
GPU when asked for); the einsum reference is the independent check for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combined_mask(length, *, causal, mask, segment_ids):
  """Boolean [B or 1, 1, Lq, Lk] mask from padding, segments and causality."""
  allowed = jnp.ones((1, 1, length, length), bool)
  if causal:
    allowed = allowed & jnp.tril(jnp.ones((length, length), bool))
  if mask is not None:
    allowed = allowed & mask[:, None, None, :]
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return allowed


def softmax_reference(q, k, v, *, causal, mask=None, segment_ids=None):
  """Plain einsum softmax attention in float32."""
  allowed = combined_mask(q.shape[1], causal=causal, mask=mask, segment_ids=segment_ids)
  return _reference_masked(q, k, v, allowed)


def _reference_masked(q, k, v, allowed):
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  logits = jnp.where(allowed, logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs, v.astype(jnp.float32))
  return out


def softmax_fast(q, k, v, *, causal, mask=None, segment_ids=None, implementation=None):
  """Exact attention through ``jax.nn.dot_product_attention`` (which takes fewer kv heads
  than query heads as they are: grouped-query attention without copies)."""
  if mask is None and segment_ids is None and v.shape[-1] == q.shape[-1]:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  allowed = combined_mask(q.shape[1], causal=causal, mask=mask, segment_ids=segment_ids)
  return attend_masked(q, k, v, allowed, implementation)


def attend_masked(q, k, v, allowed, implementation=None):
  """Exact attention of q [B, Lq, H, d] over k, v [B, Lk, K, .] where ``allowed``
  [B or 1, 1, Lq, Lk] is True; the einsum reference when v's width differs from
  q's (which ``dot_product_attention`` does not take)."""
  if v.shape[-1] != q.shape[-1]:
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    return _reference_masked(q, k, v, allowed).astype(v.dtype)
  return jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation=implementation)


# --- KV cache for decoding ---------------------------------------------------


def init_cache(batch, heads, head_dim, value_dim, max_length, dtype):
  """An empty cache of `max_length` slots for `heads` key/value heads (a grouped-query
  model's kv heads, not its query heads: that is the memory GQA saves)."""
  return {
    'k': jnp.zeros((batch, max_length, heads, head_dim), dtype),
    'v': jnp.zeros((batch, max_length, heads, value_dim), dtype),
    'valid': jnp.zeros((batch, max_length), bool),
    'index': jnp.zeros((), jnp.int32),
  }


def cache_step(cache, q, k, v, mask):
  """Writes one token at ``index`` and attends over the cache. q [B, H, D]; k, v
  [B, K, D] with K kv heads dividing H (query head h reads kv head h // (H // K))."""
  index = cache['index']
  new = {
    'k': jax.lax.dynamic_update_slice_in_dim(
      cache['k'], k[:, None].astype(cache['k'].dtype), index, 1
    ),
    'v': jax.lax.dynamic_update_slice_in_dim(
      cache['v'], v[:, None].astype(cache['v'].dtype), index, 1
    ),
    'valid': jax.lax.dynamic_update_slice_in_dim(cache['valid'], mask[:, None], index, 1),
    'index': index + 1,
  }
  batch, heads, dim = q.shape
  kv_heads = new['k'].shape[2]
  qg = q.astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads, dim)
  logits = jnp.einsum('bkgd,btkd->bkgt', qg, new['k'].astype(jnp.float32)) * dim**-0.5
  logits = jnp.where(new['valid'][:, None, None, :], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bkgt,btkd->bkgd', probs, new['v'].astype(jnp.float32))
  return out.reshape(batch, heads, -1), new


def prefill_cache(cache, k, v, mask):
  """Writes a chunk of keys at ``index`` (after whatever the cache already holds:
  chunked or multi-turn prefill)."""
  index = cache['index']
  return {
    'k': jax.lax.dynamic_update_slice_in_dim(cache['k'], k.astype(cache['k'].dtype), index, 1),
    'v': jax.lax.dynamic_update_slice_in_dim(cache['v'], v.astype(cache['v'].dtype), index, 1),
    'valid': jax.lax.dynamic_update_slice_in_dim(cache['valid'], mask, index, 1),
    'index': index + k.shape[1],
  }


def cache_prefill(cache, q, k, v, mask, implementation=None):
  """A chunk of queries q [B, C, H, d] attends over everything the cache held before
  it plus the chunk's own keys up to each query; returns (out, cache). With a fresh
  cache this is the causal pass over the prompt."""
  new = prefill_cache(cache, k, v, mask)
  slots = jnp.arange(new['k'].shape[1])
  before = slots[None, :] < (cache['index'] + jnp.arange(q.shape[1]) + 1)[:, None]
  allowed = new['valid'][:, None, None, :] & before[None, None] & mask[:, None, :, None]
  return attend_masked(q, new['k'], new['v'], allowed, implementation), new
