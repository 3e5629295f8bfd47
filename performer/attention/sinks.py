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
from performer.attention import rope_clamp as rope_clamp_lib
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


def init(batch, sinks, heads, head_dim, value_dim, dtype=jnp.float32, linear_keys=False):
  """The empty buffer of a decoding state, laid out like the window's ring;
  ``linear_keys``: each key also unrotated ('k_linear', for ``rope_clamp.py``)."""
  buffer = {
    'k': jnp.zeros((batch, sinks, heads, head_dim), dtype),
    'v': jnp.zeros((batch, sinks, heads, value_dim), dtype),
    'valid': jnp.zeros((batch, sinks), bool),
  }
  return dict(buffer, k_linear=jnp.zeros_like(buffer['k'])) if linear_keys else buffer


def _key_names(state):
  """The fields laid out like 'k' ([B, s, H, d]): 'k' and, when kept, 'k_linear'."""
  return [n for n in ('k', 'k_linear') if n in state]


def push(buffer, k, v, is_sink, k_linear=None):
  """The buffer with one token (k [B, H, d], v [B, H, D][, k_linear]) in its first
  free slot, in the rows where ``is_sink`` [B]."""
  free = jnp.sum(buffer['valid'], axis=1)
  slot = (jnp.arange(buffer['valid'].shape[1])[None] == free[:, None]) & is_sink[:, None]
  put = lambda old, new: jnp.where(slot[:, :, None, None], new[:, None].astype(old.dtype), old)
  new = {'k': k, 'v': v, 'k_linear': k_linear}
  return dict(
    {n: put(buffer[n], new[n]) for n in buffer if n != 'valid'}, valid=buffer['valid'] | slot
  )


def _searchsorted(counts, targets):
  """Per row: the first index where counts [B, N] (non-decreasing) reaches targets [B, T]."""
  return jax.vmap(lambda c, t: jnp.searchsorted(c, t, side='left'))(counts, targets)


def _take(x, pos, axis):
  """x gathered at positions pos [B, T] along `axis` (1 or 2), the batch axis aligned."""
  shape = [1] * x.ndim
  shape[0], shape[axis] = pos.shape
  return jnp.take_along_axis(x, pos.reshape(shape), axis=axis)


def _empty(like, size, value_dim, seg):
  """No sinks yet: the identity of ``combine`` from the left, with the key fields of
  ``like`` ({name: k [B, L, H, d]})."""
  b, _, h, d = like['k'].shape
  state = {n: jnp.zeros((b, size, h, d), jnp.float32) for n in like}
  return dict(
    state,
    v=jnp.zeros((b, h, size, value_dim), jnp.float32),
    valid=jnp.zeros((b, size), bool),
    seg=seg,
  )


def from_buffer(buffer, seg):
  """A decoding buffer as the state ``attend`` continues from (its sinks in segment
  ``seg`` [B]). States hold v heads-major, [B, H, s, D], like the cores' values."""
  keys = {n: buffer[n].astype(jnp.float32) for n in _key_names(buffer)}
  v = buffer['v'].swapaxes(1, 2).astype(jnp.float32)
  return dict(keys, v=v, valid=buffer['valid'], seg=seg)


def to_buffer(state, like):
  """``attend``'s state back in the layout and dtype of the decoding buffer ``like``."""
  keys = {n: state[n].astype(like[n].dtype) for n in _key_names(like)}
  return dict(keys, v=state['v'].swapaxes(1, 2).astype(like['v'].dtype), valid=state['valid'])


def compact(keys, v, flag, size, seg):
  """The first ``size`` flagged entries of ``keys`` ({name: [B, N, H, d]}) and
  heads-major v [B, H, N, D] as a sink state, valid slots first and in order."""
  n = v.shape[2]
  counts = jnp.cumsum(flag.astype(jnp.int32), axis=1)
  pos = _searchsorted(counts, jnp.broadcast_to(jnp.arange(1, size + 1), (v.shape[0], size)))
  ok = pos < n
  pos = jnp.minimum(pos, n - 1)
  state = {name: jnp.where(ok[:, :, None, None], _take(x, pos, 1), 0.0) for name, x in keys.items()}
  v = jnp.where(ok[:, None, :, None], _take(v, pos, 2), 0.0)
  return dict(state, v=v, valid=ok, seg=seg)


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
  pick = lambda n, axis, mask: jnp.where(mask, _take(later[n], idx, axis), earlier[n])  # noqa: E731
  keys = {n: pick(n, 1, late[:, :, None, None]) for n in _key_names(earlier)}
  v, valid = pick('v', 2, late[:, None, :, None]), pick('valid', 1, late)
  return dict(keys, v=v, valid=valid, seg=later['seg'])


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
  q,
  k,
  v,
  segment_ids,
  is_sink,
  incoming=None,
  far=None,
  *,
  size,
  causal,
  packed=True,
  rope_clamp=0,
  axis_name=None,
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
  ``far`` ({'q', 'k' unrotated, 'index'}, ``rope_clamp.py``): the j-th sink of a
  segment is its token j, scored at distance ``rope_clamp`` from queries further on;
  the state then keeps each sink unrotated too ('k_linear').
  """
  b, length, h, d = q.shape
  seg = segment_ids
  keys = {'k': k} if far is None else {'k': k, 'k_linear': far['k']}
  own = compact(keys, v, is_sink & (seg == seg[:, -1:]), size, seg[:, -1])
  base = incoming
  if base is None:
    base = _empty(keys, size, v.shape[-1], seg[:, 0])
  if axis_name is None:
    before, after = base, combine(base, own)
  elif causal:
    before, after = _incoming(own, axis_name, base)
  else:
    raise ValueError(
      'attention.sinks with bidirectional attention under mesh.seq is not supported '
      '(a query may need sinks from a later device)'
    )
  ek = {n: jnp.concatenate([before[n], x.astype(jnp.float32)], axis=1) for n, x in keys.items()}
  ev = jnp.concatenate([before['v'], v.astype(jnp.float32)], axis=2)  # [B, H, s + L, D]
  eseg = jnp.concatenate([jnp.broadcast_to(before['seg'][:, None], (b, size)), seg], axis=1)
  esink = jnp.concatenate([before['valid'], is_sink], axis=1).astype(jnp.int32)
  n = size + length
  counts = jnp.cumsum(esink, axis=1)
  query_pos = size + jnp.arange(length)

  def logits(gather, spec):  # [B, H, L, s]: q against the gathered sinks
    clamped = {}
    if far is not None:  # the j-th sink of a segment is its token j
      clamped = dict(far_k=gather(ek['k_linear']), query_index=far['index'][:, None, :, None])
    far_q = None if far is None else far['q']
    out = rope_clamp_lib.scores(
      spec, q, gather(ek['k']), far_q, key_index=jnp.arange(size), clamp=rope_clamp, **clamped
    )
    return out * d**-0.5

  if not packed:  # the row's first s sinks, for every query
    pos = _searchsorted(counts, jnp.broadcast_to(jnp.arange(1, size + 1), (b, size)))
    ok = pos < n
    pos = jnp.minimum(pos, n - 1)
    allowed = ok[:, None, :] & ((pos[:, None, :] <= query_pos[None, :, None]) | (not causal))
    vg = _take(ev, pos, 2)  # [B, H, s, D]
    scores = logits(lambda x: _take(x, pos, 1), 'blhd,bshd->bhls')
    return _weighted(scores, allowed[:, None], vg, 'bhls,bhsd->bhld') + (after,)
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
  vg = _take(ev, pos, 2).reshape(b, h, length, size, -1)
  scores = logits(lambda x: _take(x, pos, 1).reshape(b, length, size, h, d), 'blhd,blshd->bhls')
  return _weighted(scores, ok.reshape(b, 1, length, size), vg, 'bhls,bhlsd->bhld') + (after,)


def read(buffer, q, far=None, rope_clamp=0):
  """The exact part for one decoding query q [B, H, d] over a buffer with q's heads:
  (num [B, H, D], den [B, H], shift [B, H]); ``far`` ({'q' [B, 1, H, d], 'index'
  [B, 1]}) as in ``attend``."""
  scale, size = q.shape[-1] ** -0.5, buffer['valid'].shape[1]
  clamped = {}
  if far is not None:
    clamped = dict(far_k=buffer['k_linear'], query_index=far['index'][:, :, None])  # [B, 1, 1]
  far_q = None if far is None else far['q'][:, 0]
  logits = rope_clamp_lib.scores(
    'bhd,bshd->bhs', q, buffer['k'], far_q, key_index=jnp.arange(size), clamp=rope_clamp, **clamped
  )
  values = buffer['v'].astype(jnp.float32)
  return _weighted(logits * scale, buffer['valid'][:, None, :], values, 'bhs,bshd->bhd')


def _weighted(logits, allowed, values, spec):
  """(num, den, shift) of the allowed logits [B, H, L, s] over their values."""
  logits = jnp.where(allowed, logits, NEG)
  shift = sg(jnp.max(logits, axis=-1))
  weights = jnp.where(allowed, linear.safe_exp(logits - shift[..., None]), 0.0)
  return jnp.einsum(spec, weights, values), jnp.sum(weights, axis=-1), shift
