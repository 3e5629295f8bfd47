"""Attention sinks: the first s tokens of every sequence attended exactly.

Pretrained softmax models park a large share of their attention on the first few
tokens (StreamingLLM, Xiao et al. 2023; 28-60% past layer 12 of SmolLM2 by our own
measurement). A feature map spreads that mass over every key, and a window loses
the sinks after W tokens. With ``attention.sinks = s`` the first s valid tokens of
each sequence (of each packed segment) leave the window and the linear part, so
nothing counts twice, and every later query of their segment scores them exactly:

    y_n = [g_s sum_{i in sinks(n)} exp(s_ni) v_i + window + linear] / [the same without v]

under the one normaliser of ``window.hybrid``. g_s = exp(sink_log_gain) is a learned
per-head gain of the sinks' own, initialised to 1 (so sinks plus a window covering
the sequence are still exact softmax): the sinks exist without a window too, and a
sink's share of attention is not a window key's, so tying the two gains would force
a compromise on both.

Which tokens are sinks depends on the mask and segment ids only (``flags``), never on
the values, so the part cannot look ahead; a query gathers the j-th sink of its
segment (j < s) and drops those after it. Continuing from a decoding state, or on a
device of a sequence split over ``mesh.seq``, the sinks seen before the span arrive
as a state of s slots: the sinks of the last segment so far. Those states combine
associatively (``combine``), so under sequence parallelism each device's travels in
the same all-gather-and-fold as the linear state (``linear.incoming_state``), P x s
keys whatever the length. Bidirectional attention under ``mesh.seq`` would also need
sinks from later devices; it raises instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from performer.attention import linear
from performer.attention.linear import NEG

sg = jax.lax.stop_gradient


def flags(valid, segment_ids, sinks, held=None):
  """is_sink [B, L]: the first ``sinks`` valid tokens of each segment. ``held`` [B]:
  sinks a decoding state already holds, which precede the first segment."""
  v = valid.astype(jnp.int32)
  count = jnp.cumsum(v, axis=1)  # valid tokens up to and including each position
  start = jnp.concatenate(
    [jnp.ones_like(valid[:, :1]), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  base = jax.lax.cummax(jnp.where(start, count - v, 0), axis=1)  # count before the segment
  rank = count - base
  if held is not None:
    first = jnp.cumsum(start.astype(jnp.int32), axis=1) == 1
    rank = rank + jnp.where(first, held[:, None], 0)
  return valid & (rank <= sinks)


def init(batch, sinks, heads, head_dim, value_dim, dtype=jnp.float32):
  """The empty buffer of a decoding state, laid out like the window's ring."""
  return {
    'k': jnp.zeros((batch, sinks, heads, head_dim), dtype),
    'v': jnp.zeros((batch, sinks, heads, value_dim), dtype),
    'valid': jnp.zeros((batch, sinks), bool),
  }


def push(buffer, k, v, is_sink):
  """The buffer with one token (k [B, H, d], v [B, H, D]) in its first free slot,
  in the rows where ``is_sink`` [B]."""
  free = jnp.sum(buffer['valid'], axis=1)
  slot = (jnp.arange(buffer['valid'].shape[1])[None] == free[:, None]) & is_sink[:, None]
  put = lambda old, new: jnp.where(slot[:, :, None, None], new[:, None].astype(old.dtype), old)
  return {'k': put(buffer['k'], k), 'v': put(buffer['v'], v), 'valid': buffer['valid'] | slot}


def _searchsorted(counts, targets):
  """Per row: the first index where counts [B, N] (non-decreasing) reaches targets [B, T]."""
  return jax.vmap(lambda c, t: jnp.searchsorted(c, t, side='left'))(counts, targets)


def _take(x, pos, axis):
  """x gathered at positions pos [B, T] along `axis` (1 or 2), the batch axis aligned."""
  shape = [1] * x.ndim
  shape[0], shape[axis] = pos.shape
  return jnp.take_along_axis(x, pos.reshape(shape), axis=axis)


def _empty(batch, size, heads, head_dim, value_dim, seg):
  """No sinks yet: the identity of ``combine`` from the left."""
  return {
    'k': jnp.zeros((batch, size, heads, head_dim), jnp.float32),
    'v': jnp.zeros((batch, heads, size, value_dim), jnp.float32),
    'valid': jnp.zeros((batch, size), bool),
    'seg': seg,
  }


def from_buffer(buffer, seg):
  """A decoding buffer as the state ``attend`` continues from (its sinks in segment
  ``seg`` [B]). States hold v heads-major, [B, H, s, D], like the cores' values."""
  return {
    'k': buffer['k'].astype(jnp.float32),
    'v': buffer['v'].swapaxes(1, 2).astype(jnp.float32),
    'valid': buffer['valid'],
    'seg': seg,
  }


def to_buffer(state, like):
  """``attend``'s state back in the layout and dtype of the decoding buffer ``like``."""
  return {
    'k': state['k'].astype(like['k'].dtype),
    'v': state['v'].swapaxes(1, 2).astype(like['v'].dtype),
    'valid': state['valid'],
  }


def compact(k, v, flag, size, seg):
  """The first ``size`` flagged entries of k [B, N, H, d] and heads-major v
  [B, H, N, D] as a sink state, valid slots first and in order."""
  counts = jnp.cumsum(flag.astype(jnp.int32), axis=1)
  pos = _searchsorted(counts, jnp.broadcast_to(jnp.arange(1, size + 1), (k.shape[0], size)))
  ok = pos < k.shape[1]
  pos = jnp.minimum(pos, k.shape[1] - 1)
  return {
    'k': jnp.where(ok[:, :, None, None], _take(k, pos, 1), 0.0),
    'v': jnp.where(ok[:, None, :, None], _take(v, pos, 2), 0.0),
    'valid': ok,
    'seg': seg,
  }


def combine(earlier, later):
  """The sink state of two adjacent spans: that of ``later``'s last segment. When the
  spans join (``later`` ends in the segment ``earlier`` ends in, so lies wholly in
  it) ``earlier``'s sinks come first; ``flags`` leaves at most s in all."""
  size = earlier['valid'].shape[1]
  joined = earlier['seg'] == later['seg']
  held = jnp.where(joined, jnp.sum(earlier['valid'], axis=1), 0)
  slots = jnp.arange(size)[None]
  late = slots >= held[:, None]  # [B, s]: this slot comes from `later`
  idx = jnp.clip(slots - held[:, None], 0, size - 1)
  return {
    'k': jnp.where(late[:, :, None, None], _take(later['k'], idx, 1), earlier['k']),
    'v': jnp.where(late[:, None, :, None], _take(later['v'], idx, 2), earlier['v']),
    'valid': jnp.where(late, _take(later['valid'], idx, 1), earlier['valid']),
    'seg': later['seg'],
  }


def _incoming(local, axis_name, base):
  """(sinks before this device's span, sinks after every span): one all-gather of
  the per-device states and a fold, as ``linear.incoming_state`` does for (S, z)."""
  gathered = jax.lax.all_gather(local, axis_name)
  prefix, before = base, []
  for device in range(gathered['valid'].shape[0]):
    before.append(prefix)
    prefix = combine(prefix, jax.tree.map(lambda x, i=device: x[i], gathered))
  pick = lambda *xs: jnp.stack(xs)[jax.lax.axis_index(axis_name)]
  return jax.tree.map(pick, *before), prefix


def attend(
  q, k, v, segment_ids, is_sink, incoming=None, *, size, causal, packed=True, axis_name=None
):
  """The exact sink part, (num [B, H, L, D], den [B, H, L], shift [B, H, L]), and the
  sink state after the span.

  q, k [B, L, H, d] raw (k with q's heads); v [B, H, L, D]; is_sink [B, L] from
  ``flags``; ``incoming``: the state before the span (a decoding state's, through
  ``from_buffer``), or None. Query n scores the sinks of its segment, at or before
  it when causal: the j-th is the first position where the count of sinks since the
  segment's start reaches j + 1, found by a search on that count, so the gathers
  are [B, L, s] whatever the number of segments. ``packed=False`` (no segment ids:
  one segment per row) lets every query share the row's s sinks, gathered once.
  """
  b, length, h, d = q.shape
  seg = segment_ids
  own = compact(k, v, is_sink & (seg == seg[:, -1:]), size, seg[:, -1])
  base = incoming
  if base is None:
    base = _empty(b, size, h, d, v.shape[-1], seg[:, 0])
  if axis_name is None:
    before, after = base, combine(base, own)
  elif causal:
    before, after = _incoming(own, axis_name, base)
  else:
    raise ValueError(
      'attention.sinks with bidirectional attention under mesh.seq is not supported '
      '(a query may need sinks from a later device)'
    )
  ek = jnp.concatenate([before['k'], k.astype(jnp.float32)], axis=1)  # [B, s + L, H, d]
  ev = jnp.concatenate([before['v'], v.astype(jnp.float32)], axis=2)  # [B, H, s + L, D]
  eseg = jnp.concatenate([jnp.broadcast_to(before['seg'][:, None], (b, size)), seg], axis=1)
  esink = jnp.concatenate([before['valid'], is_sink], axis=1).astype(jnp.int32)
  n = size + length
  counts = jnp.cumsum(esink, axis=1)
  query_pos = size + jnp.arange(length)
  if not packed:  # the row's first s sinks, for every query
    pos = _searchsorted(counts, jnp.broadcast_to(jnp.arange(1, size + 1), (b, size)))
    ok = pos < n
    pos = jnp.minimum(pos, n - 1)
    allowed = ok[:, None, :] & ((pos[:, None, :] <= query_pos[None, :, None]) | (not causal))
    kg, vg = _take(ek, pos, 1), _take(ev, pos, 2)  # [B, s, H, d], [B, H, s, D]
    logits = jnp.einsum('blhd,bshd->bhls', q.astype(jnp.float32), kg) * d**-0.5
    return _weighted(logits, allowed[:, None], vg, 'bhls,bhsd->bhld') + (after,)
  start = jnp.concatenate([jnp.ones((b, 1), bool), eseg[:, 1:] != eseg[:, :-1]], axis=1)
  seg_start = jax.lax.cummax(jnp.where(start, jnp.arange(n)[None], 0), axis=1)
  prior = jnp.take_along_axis(counts - esink, seg_start, axis=1)[:, size:]  # [B, L]
  targets = (prior[:, :, None] + jnp.arange(1, size + 1)).reshape(b, length * size)
  pos = _searchsorted(counts, targets)  # [B, L * s]: query-major
  ok = pos < n
  pos = jnp.minimum(pos, n - 1)
  ok &= _take(eseg, pos, 1) == jnp.repeat(seg, size, axis=1)
  if causal:
    ok &= pos <= jnp.repeat(query_pos, size)[None]
  kg = _take(ek, pos, 1).reshape(b, length, size, h, d)
  vg = _take(ev, pos, 2).reshape(b, h, length, size, -1)
  logits = jnp.einsum('blhd,blshd->bhls', q.astype(jnp.float32), kg) * d**-0.5
  return _weighted(logits, ok.reshape(b, 1, length, size), vg, 'bhls,bhlsd->bhld') + (after,)


def _weighted(logits, allowed, values, spec):
  """(num, den, shift) of the allowed logits [B, H, L, s] over their values."""
  logits = jnp.where(allowed, logits, NEG)
  shift = sg(jnp.max(logits, axis=-1))
  weights = jnp.where(allowed, linear.safe_exp(logits - shift[..., None]), 0.0)
  return jnp.einsum(spec, weights, values), jnp.sum(weights, axis=-1), shift
