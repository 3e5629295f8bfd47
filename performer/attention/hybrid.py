"""Hybrid attention: a ``LinearAttention`` plus exact parts under one normaliser.

The exact parts are softmax over a sliding window (``window.py``), over the first tokens
of each segment (``sinks.py``) and over LoLA's sparse cache of evicted window keys
(``sparse_cache.py``); the feature map covers every other key. The registry picks the
class once, from the options (``registry.attention_class``): ``HybridAttention``,
``SparseCacheAttention`` (``cached.py``: its forward pass is a chunked prefill) or, for
the ``window_off`` ablation, ``WindowOffAttention``; so plain linear attention carries
none of this and models never branch on it. Subclasses rather than wrappers: the feature
map and the gains keep their parameter paths (``attend.feature_map.*``,
``attend.window_log_gain``, ``attend.sink_log_gain``), so checkpoints of earlier hybrids
restore.

The decoding state, a fixed size whatever the context:

    {'linear': (S, z, M), 'ring': W recent pairs, 'sinks': s pairs, 'cache': lambda pairs}

(each key present when its part is on). The ring, the sinks and the cache hold kv heads,
as a KV cache does (a query head reads its group's, ``layers.repeat_kv``); the linear
state is per query head, each with its own feature map. A sink never enters the ring or
the linear state; a key leaves the ring into the sparse cache's candidates (with a
cache) or into the linear state. With ``linear_nope`` the feature map sees q, k before
rotary positions (``linear_qk``) while the exact parts score the rotated ones, so the
ring and the cache also keep each key unrotated ('k_linear'), for the features it gets
when it leaves them. With ``linear_half_life`` the linear part decays (``decay.py``):
the state counts valid tokens ('count') and the ring and the cache keep each key's index
('index'), for its decay when it leaves them. With ``rope_clamp`` (``rope_clamp.py``) they
do so too, for the distances, and the sinks also keep each key unrotated.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from performer.attention import context_parallel, decay, linear, sparse_cache
from performer.attention import rope_clamp as rope_clamp_lib
from performer.attention import sinks as sinks_lib
from performer.attention import window as window_lib
from performer.attention.feature_map import FeatureParam
from performer.attention.layers import (
  LinearAttention,
  check_inputs,
  zero_padded_queries,
)


class WindowOffAttention(LinearAttention):
  """A window hybrid with its window removed (``window_off``, an evaluation
  ablation): linear attention over every key, what the linear part carries on its
  own. It keeps the gain, so the hybrid's checkpoint restores."""

  def __init__(self, map_class, name, head_dim, num_heads, options, *, rngs=None, projection=None):
    super().__init__(
      map_class, name, head_dim, num_heads, options, rngs=rngs, projection=projection
    )
    self.window_log_gain = FeatureParam(jnp.zeros((num_heads,), jnp.float32))


class HybridAttention(LinearAttention):
  """Linear attention with a window, sinks and/or a sparse cache (see the module
  docstring); each part's gain is a ``FeatureParam`` per head, log-scale, 0 at init."""

  def __init__(self, map_class, name, head_dim, num_heads, options, *, rngs=None, projection=None):
    super().__init__(
      map_class, name, head_dim, num_heads, options, rngs=rngs, projection=projection
    )
    if options.window:  # exact softmax over the last W keys (window.py): its gain per head
      self.window_log_gain = FeatureParam(jnp.zeros((num_heads,), jnp.float32))
    if options.sinks:  # exact softmax over the first s tokens (sinks.py): a gain of their own
      self.sink_log_gain = FeatureParam(jnp.zeros((num_heads,), jnp.float32))
    # window_off (with sinks) keeps the window's gain but not the window, nor the
    # sparse cache, a store of evicted window keys.
    self.window = 0 if options.window_off else options.window
    self.sinks = options.sinks
    self.cache_size = 0 if options.window_off else options.sparse_cache
    self.rope_clamp = options.rope_clamp if self.sinks or self.cache_size else 0

  def _attend(self, q, k, v, *, causal, mask, segment_ids, linear_qk=None, far_q=None):
    lin = self._linear_pair(q, k, linear_qk)
    k, v = self._query_heads(k), self._query_heads(v).swapaxes(1, 2)  # v [B, H, L, D]
    num, den = self._hybrid(
      q, k, v, lin, causal=causal, mask=mask, segment_ids=segment_ids, far_q=far_q
    )
    return self._output(num, den, v)

  def _query_heads(self, x):
    """[B, N, K, ...] kv heads -> [B, N, H, ...], query head h reading kv head h // (H / K)."""
    return jnp.repeat(x, self.num_heads // x.shape[2], axis=2)

  def _stored_for_queries(self, entries):
    """Ring, sink or cache entries, stored per kv head, with the query heads."""
    return {n: self._query_heads(x) if x.ndim >= 3 else x for n, x in entries.items()}

  @property
  def _linear_keys(self) -> bool:
    """The ring and cache also hold each key as the feature map saw it."""
    return self.options.linear_nope

  def _linear_pair(self, q, k, linear_qk):
    """What the feature map sees, (q, k) or ``linear_qk``, k with its kv heads (as the
    ring and the cache store it); ``linear_qk`` needs ``linear_nope``, which makes them
    keep it (else decoding would differ)."""
    if linear_qk is not None and not self._linear_keys:
      raise ValueError(
        'linear_qk: a hybrid feeds its feature map other inputs than q, k only with '
        'attention.linear_nope=True'
      )
    return (q, k) if linear_qk is None else linear_qk

  def _calibrate(self, lin, **kwargs):
    """The feature map's context for ``lin`` (its keys given q's heads)."""
    return self.feature_map.calibrate(lin[0], self._query_heads(lin[1]), **kwargs)

  def init_state(self, batch, value_dim, *, num_kv_heads=None, max_length=None, dtype=jnp.float32):
    del max_length  # a fixed size whatever the context
    heads, head_dim, both = num_kv_heads or self.num_heads, self.head_dim, self._linear_keys
    features, indexed = self.feature_map.num_features, self._indexed
    state = {'linear': linear.init_state(batch, self.num_heads, features, value_dim)}
    if indexed:  # valid tokens seen: the next one's index (decay.py)
      state['count'] = jnp.zeros((batch,), jnp.int32)
    if self.window:
      state['ring'] = window_lib.init_ring(
        batch, self.window, heads, head_dim, value_dim, dtype, linear_keys=both, indexed=indexed
      )
    if self.sinks:
      state['sinks'] = sinks_lib.init(
        batch, self.sinks, heads, head_dim, value_dim, dtype, linear_keys=bool(self.rope_clamp)
      )
    if self.cache_size:
      stored = sparse_cache.storage_dtype(self.options.sparse_cache_dtype, dtype)
      state['cache'] = sparse_cache.init(
        batch, self.cache_size, heads, head_dim, value_dim, stored, both, indexed
      )
    return state

  def _entries(self, k, v, valid, k_lin, index):
    """A ring or cache entry: {'k', 'v', 'valid'} and, when kept, 'k_linear', 'index'."""
    entries = {'k': k, 'v': v, 'valid': valid}
    if self._linear_keys:
      entries['k_linear'] = k_lin
    return dict(entries, index=index) if self._indexed else entries

  @property
  def _indexed(self) -> bool:
    """The state counts valid tokens, the ring and the cache keep each key's index:
    for the decay and for the clamp's distances."""
    return bool(self._rate or self.rope_clamp)

  def _far_query(self, far_q):
    """``far_q`` [B, L, H, d] (the queries rotated to the clamp), required with one."""
    if self.rope_clamp and far_q is None:
      raise ValueError(
        'attention.rope_clamp scores far keys from far_q, the queries rotated to the '
        'clamp distance; the model passes it (SelfAttention)'
      )
    return far_q if self.rope_clamp else None

  @property
  def _rate(self) -> float:
    """The linear part's log decay per token (decay.py); 0: none."""
    half_life = self.options.linear_half_life
    return decay.log_rate(half_life) if half_life else 0.0

  def _decayed_keys(self, kr, entries):
    """kr [B, H, N] of ring or cache entries with their decay from 'index'."""
    if not self._rate:
      return kr
    index = entries['index']  # [B, N] (ring) or per kv head [B, N, K] (cache)
    index = self._query_heads(index).swapaxes(1, 2) if index.ndim == 3 else index
    return decay.keys(kr, index, self._rate)

  def _feature_keys(self, entries, valid, ctx):
    """(kf, kr) [B, H, N, .] of ring or cache entries: what the feature map sees of each key."""
    keys = self._query_heads(entries.get('k_linear', entries['k']))
    kf, kr = self.feature_map.masked_key(keys, valid, ctx)
    return kf, self._decayed_keys(kr, entries)

  def prefill(self, state, q, k, v, *, mask=None, linear_qk=None, far_q=None):
    """Causal pass continuing from ``state``: the ring's keys precede q."""
    check_inputs(q, k, v, mask, None)
    lin = self._linear_pair(q, k, linear_qk)
    return self._prefill_chunk(state, q, k, v, lin, mask, far_q=far_q)

  def step(self, state, q, k, v, *, mask=None, linear_qk=None, far_q=None):
    """One token: it joins the sinks while they are not full, else the ring, whose
    evicted key joins the cache's candidates (with a cache) or the linear state."""
    q_lin, k_lin = self._linear_pair(q, k, linear_qk)  # k, v [B, K, .]: kv heads
    valid = jnp.ones(q.shape[:1], bool) if mask is None else mask
    fmap, read = self.feature_map, self._stored_for_queries
    ctx = self._calibrate((q_lin[:, None], k_lin[:, None]), causal=True, mask=valid[:, None])
    window_gain, sink_gain = self._gains()
    new, parts, key_valid = dict(state), [], valid
    index = state['count'] if self._indexed else None
    if self._indexed:
      new['count'] = index + valid
    far_q, clamp = self._far_query(far_q), self.rope_clamp
    far = None if far_q is None else {'q': far_q[:, None], 'index': index[:, None]}
    if self.sinks:
      is_sink = valid & (jnp.sum(state['sinks']['valid'], axis=1) < self.sinks)
      k_sink = k_lin if clamp else None
      new['sinks'] = sinks_lib.push(state['sinks'], k, v, is_sink, k_sink)
      key_valid = valid & ~is_sink
    enter = self._entries(k, v, key_valid, k_lin, index)  # what leaves the exact parts now
    if self.window:
      new['ring'], enter = window_lib.ring_push(state['ring'], enter)
      w_num, w_den, w_shift = window_lib.ring_read(read(new['ring']), q)
      parts.append((w_num, w_den, w_shift + window_gain))
    if self.sinks:
      s_num, s_den, s_shift = sinks_lib.read(read(new['sinks']), q, far, clamp)
      parts.append((s_num, s_den, s_shift + sink_gain))
    enter = {name: x[:, None] for name, x in enter.items()}  # a time axis of one
    kf, kr = self._feature_keys(enter, enter['valid'], ctx)
    v_in = self._query_heads(enter['v'])[:, 0].astype(jnp.float32)
    lin = linear.add_key(state['linear'], kf[:, :, 0], kr[:, :, 0], v_in)
    new['linear'] = lin
    if self.cache_size:
      c_num, c_den, c_shift = sparse_cache.read(read(state['cache']), q[:, None], far, clamp)
      parts.append((c_num[:, :, 0], c_den[:, :, 0], c_shift[:, :, 0] + window_gain))
      new['cache'], new['linear'] = self._recache(state, enter, ctx)
    qf, q_r = fmap.query_parts(q_lin[:, None], ctx)
    if self._rate:
      q_r = decay.queries(q_r, index[:, None], self._rate)
    l_num, l_den = linear.read_state(lin, qf[:, :, 0])
    parts.append((l_num, l_den, q_r[:, :, 0] + lin['M']))
    num, den = linear.merge(parts)
    return linear.normalise(num, den, self.options.eps).astype(v.dtype), new

  def _scores(self, q, k, *, causal, mask, segment_ids, linear_qk=None):
    """window.scores with the sinks."""
    if self.rope_clamp and q.shape[1] > self.rope_clamp:  # shorter: the clamp never acts
      raise ValueError(
        f'weights(): no attention matrix over {q.shape[1]} positions with '
        f'attention.rope_clamp={self.rope_clamp} (the clamp acts past it)'
      )
    fmap, (q_lin, k_lin) = self.feature_map, self._linear_pair(q, k, linear_qk)
    k_lin = self._query_heads(k_lin)
    ctx = fmap.calibrate(q_lin, k_lin, causal=causal, mask=mask, segment_ids=segment_ids)
    qf, q_r = fmap.query_parts(q_lin, ctx)
    kf, kr = fmap.key(k_lin, ctx)
    valid = jnp.ones(q.shape[:2], bool) if mask is None else mask
    q_r, kr = self._decayed(q_r, kr, valid, causal)
    sink_cols = None
    if self.sinks:
      seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
      sink_cols = sinks_lib.flags(valid, seg, self.sinks)
    window_gain, sink_gain = self._gains()
    return window_lib.scores(
      q,
      k,
      qf,
      q_r,
      kf,
      kr,
      window=self.window,
      causal=causal,
      log_gain=window_gain,
      sink_cols=sink_cols,
      sink_log_gain=sink_gain,
    )

  def _decayed(self, q_r, kr, valid, causal, start=None):
    """(q_r, kr) [B, H, L] with the linear part's decay (none without
    ``linear_half_life``); ``start`` [B]: valid tokens a decoding state has seen."""
    if not self._rate:
      return q_r, kr
    if not causal:
      raise ValueError('attention.linear_half_life decays toward the past: causal attention only')
    index = decay.row_index(valid, start)
    return decay.queries(q_r, index, self._rate), decay.keys(kr, index, self._rate)

  def _gains(self):
    """(window gain or None, sink gain or None), log-scale [H]."""
    window = self.window_log_gain[...] if self.window else None
    return window, (self.sink_log_gain[...] if self.sinks else None)

  def _hybrid(self, q, k, v, lin, *, causal, mask, segment_ids, state=None, ctx=None, far_q=None):
    """window.hybrid with this module's feature map; k, v with q's heads, v
    heads-major, ``lin`` the (q, k) the feature map sees (k's kv heads). Without a
    state: (num, den). With a decoding ``state`` (a causal prefill: the ring's keys precede q, the
    linear state holds everything before them, the sinks and the cache are the
    state's): (num, den, linear state, sink state or None, key_valid [B, L]: the
    keys that may enter the ring)."""
    fmap, (q_lin, k_lin) = self.feature_map, (lin[0], self._query_heads(lin[1]))
    if ctx is None:
      ctx = fmap.calibrate(q_lin, k_lin, causal=causal, mask=mask, segment_ids=segment_ids)
    qf, q_r = fmap.query_parts(q_lin, ctx)
    valid = jnp.ones(q.shape[:2], bool) if mask is None else mask
    seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    key_mask, is_sink, sinks_in, context, initial, cache = mask, None, None, None, None, None
    if self.sinks:  # the sinks leave the window and the linear part
      held = None if state is None else jnp.sum(state['sinks']['valid'], axis=1)
      is_sink = sinks_lib.flags(valid, seg, self.sinks, held)
      key_mask = valid & ~is_sink
    kf, kr = fmap.masked_key(k_lin, key_mask, ctx)
    start = None if state is None or not self._indexed else state['count']
    q_r, kr = self._decayed(q_r, kr, valid, causal, start)
    far, far_q = None, self._far_query(far_q)
    if far_q is not None:
      index = rope_clamp_lib.query_index(valid, segment_ids, start)
      far = rope_clamp_lib.far_inputs(far_q, k_lin, index)
    if state is not None:
      initial = state['linear']
      if self.cache_size:
        cache = self._stored_for_queries(state['cache'])
      if self.sinks:
        sinks_in = sinks_lib.from_buffer(self._stored_for_queries(state['sinks']), seg[:, 0])
      if self.window:
        ring = self._stored_for_queries(window_lib.ring_ordered(state['ring']))
        ring_kf, ring_kr = self._feature_keys(ring, ring['valid'], ctx)
        context = {
          'k': ring['k'],
          'v': ring['v'].swapaxes(1, 2),
          'valid': ring['valid'],
          'seg': jnp.zeros(ring['valid'].shape, seg.dtype),
          'kf': ring_kf,
          'kr': ring_kr,
        }
    core = functools.partial(
      window_lib.hybrid,
      window=self.window,
      causal=causal,
      chunk_size=self.options.chunk_size,
      sinks=self.sinks,
      packed=segment_ids is not None,
      rope_clamp=self.rope_clamp,
      return_state=state is not None,
    )
    window_gain, sink_gain = self._gains()
    args = (q, k, v, qf, q_r, kf, kr, seg, key_mask, window_gain, context, initial)
    args += (is_sink, sink_gain, sinks_in, cache, far)
    rep = context_parallel.REPLICATED
    in_axes = (1, 1, 2, 2, 2, 2, 2, 1, 1, rep, None, None, 1, rep, None, None, 1)
    if state is None:
      return context_parallel.over_length(core, args, in_axes, (2, 2))
    out_axes = (2, 2, None) + ((None,) if self.sinks else ())
    num, den, lin, *sink_state = context_parallel.over_length(core, args, in_axes, out_axes)
    key_valid = valid if key_mask is None else key_mask
    return num, den, lin, (sink_state or [None])[0], key_valid

  def _prefill_chunk(self, state, q, k, v, lin, mask, ctx=None, far_q=None):
    """One causal pass continuing from ``state`` (k, v [B, L, K, .] kv heads; ``lin``
    the feature map's (q, k)); with a sparse cache, the cache is updated once, from
    the keys the pass evicted. The ring keeps each row's last W valid keys
    (``window.ring_append``), so a right-padded prompt's own recent keys stay exact;
    the rest of ring + chunk joins the linear state (or the cache's candidates)."""
    if ctx is None:  # once: calibrating may update the map's statistics
      ctx = self._calibrate(lin, causal=True, mask=mask)
    k_heads, v_heads = self._query_heads(k), self._query_heads(v).swapaxes(1, 2)
    num, den, linear_state, sink_state, key_valid = self._hybrid(
      q,
      k_heads,
      v_heads,
      lin,
      causal=True,
      mask=mask,
      segment_ids=None,
      state=state,
      ctx=ctx,
      far_q=far_q,
    )
    new = dict(state, linear=linear_state)
    valid = jnp.ones(q.shape[:2], bool) if mask is None else mask
    index = decay.row_index(valid, state['count']) if self._indexed else None
    if self._indexed:
      new['count'] = state['count'] + jnp.sum(valid, axis=1, dtype=jnp.int32)
    if self.sinks:  # the heads of a group hold the same sinks: keep one each
      group = self.num_heads // k.shape[2]
      buffer = sinks_lib.to_buffer(sink_state, self._stored_for_queries(state['sinks']))
      new['sinks'] = {n: x[:, :, ::group] if x.ndim >= 3 else x for n, x in buffer.items()}
    if self.window:  # the linear state: the old one plus what leaves the ring
      entries = self._entries(k, v, key_valid, lin[1], index)
      new['ring'], leaving = window_lib.ring_append(state['ring'], entries)
      if self.cache_size:
        new['cache'], new['linear'] = self._recache(state, leaving, ctx)
      else:
        kf, kr = self._feature_keys(leaving, leaving['valid'], ctx)
        v_out = self._query_heads(leaving['v']).swapaxes(1, 2).astype(jnp.float32)
        new['linear'] = linear.add_keys(state['linear'], kf, kr, v_out)
    return zero_padded_queries(self._output(num, den, v_heads), mask), new

  def _recache(self, state, evicted, ctx):
    """``sparse_cache.update`` from the state's cache and the ``evicted`` entries
    ({'k' [B, N, K, d], 'v', 'valid' [B, N][, 'k_linear']}, kv heads), against the
    state's linear part (which holds neither)."""
    cache = state['cache']
    heads = cache['valid'].shape[2]
    per_head = lambda x: jnp.broadcast_to(x[:, :, None], x.shape + (heads,))  # noqa: E731
    evicted = dict(evicted, valid=per_head(evicted['valid']))
    if self._indexed:
      evicted['index'] = per_head(evicted['index'])
    wider = lambda x, y: jnp.promote_types(x.dtype, y.dtype)  # noqa: E731 (score before rounding)
    candidates = {
      name: jnp.concatenate([x.astype(wider(x, evicted[name])), evicted[name]], axis=1)
      for name, x in cache.items()
    }
    keys = self._query_heads(candidates.get('k_linear', candidates['k']))
    kf, kr = self.feature_map.key(keys, ctx)
    kr = self._decayed_keys(kr, candidates)
    leave_one_out = self.options.sparse_cache_leave_one_out
    return sparse_cache.update(cache, state['linear'], candidates, kf, kr, leave_one_out)
