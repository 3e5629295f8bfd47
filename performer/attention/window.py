"""Hybrid attention: exact softmax over a sliding window, linear attention beyond.

LoLCATs (Zhang et al. 2024) found that keeping the last W keys exact is the
largest single gain when linearizing a pretrained model: the sharp, local part of
softmax is what random or learned features approximate worst. For query n,

    y_n = [g sum_{i in win(n)} exp(s_ni) v_i + sum_{j outside} phi(q_n).phi(k_j) v_j]
          / [the same two sums without v],

s_ni = q_n.k_i / sqrt(d), g > 0 a learned gain per head. Causal: win(n) = (n-W, n]
and "outside" = j <= n-W. Bidirectional: win(n) = |i-n| < W and "outside" is both
sides beyond it. One normaliser covers both parts, so the weights sum to one; with
W >= L it is exact softmax. (LoLCATs' gain is a sigmoid; ours is exp(log_gain),
initialised to 1, so a FAVOR kind starts as an unbiased estimate of softmax.)

Each part is computed relative to its own shift and the parts are merged under
their common maximum, so nothing overflows and nothing looks ahead: the linear
part is ``linear.causal_chunked`` on keys shifted right by W (their segments
shifted with them), the window part a blocked band of width W. Decoding keeps a
W-entry ring buffer of raw (k, v) plus the linear state; the key leaving the ring
enters the state, so memory stays constant in context length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from performer.attention import linear, sparse_cache
from performer.attention import sinks as sinks_lib
from performer.attention.linear import NEG

sg = jax.lax.stop_gradient


def _from_neighbour(x, n, axis, axis_name, reverse):
  """Under sequence parallelism: the n entries of the neighbouring device's span
  that precede this device's along the (local) sequence: the previous device's
  last n, or with ``reverse`` (a locally flipped pass) the next device's first n,
  flipped. Returns (entries, whether that neighbour exists); a missing one gives
  zeros."""
  devices, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  length = x.shape[axis]
  edge = jax.lax.slice_in_dim(x, length - n, length, axis=axis)
  if reverse:
    perm, exists = [(i + 1, i) for i in range(devices - 1)], index < devices - 1
  else:
    perm, exists = [(i, i + 1) for i in range(devices - 1)], index > 0
  return jax.lax.ppermute(edge, axis_name, perm), exists


def _front(x, n, axis, fill, axis_name=None, reverse=False, context=None):
  """The n entries that precede x along `axis`: the last n of `context` (the keys
  of a decoding ring) if given, else `fill` (None: x's first entry repeated, for
  segment ids); under sequence parallelism the neighbouring device's last n where
  there is one."""
  if context is not None:
    size = context.shape[axis]
    front = jax.lax.slice_in_dim(context, size - n, size, axis=axis).astype(x.dtype)
  elif fill is None:
    front = jnp.repeat(jax.lax.slice_in_dim(x, 0, 1, axis=axis), n, axis=axis)
  else:
    shape = list(x.shape)
    shape[axis] = n
    front = jnp.full(shape, fill, x.dtype)
  if axis_name is not None:
    halo, exists = _from_neighbour(x, n, axis, axis_name, reverse)
    front = jnp.where(exists, halo, front)
  return front


def _shift_right(x, w, axis, fill, axis_name=None, reverse=False, context=None):
  """x moved w places later along `axis`, `_front`'s entries filling the start."""
  front = _front(x, w, axis, fill, axis_name, reverse, context)
  return jax.lax.slice_in_dim(jnp.concatenate([front, x], axis=axis), 0, x.shape[axis], axis=axis)


def band(q, k, v, segment_ids, mask, window, causal, axis_name=None, context=None):
  """The exact part: (num [B, H, L, D], den [B, H, L], shift [B, H, L]) over keys
  within the window, in blocks of W queries that see their own block and the
  neighbouring one(s). q, k [B, L, H, d], v [B, H, L, D] (k, v with q's heads).
  Under sequence parallelism (``axis_name``) the keys within W of either end of
  this device's span come from the neighbouring devices; a causal ``context``
  (``hybrid``'s) supplies the W keys before the first position."""
  b, length, h, d = q.shape
  w = max(1, min(window, length))
  pad = -length % w
  n = (length + pad) // w
  before, after = (window if context is not None else w), (w if not causal else 0)
  ctx = context or {}

  def blocks(x, front, back, fill, ctx_x=None):
    """x [B, ., L, ...] (length axis 2; 1 for [B, L] arrays) with `front` and `back`
    entries around it (fill, the context's or the neighbours' keys) and the block
    padding."""
    axis = 1 if x.ndim == 2 else 2
    parts = [x]
    if front:
      parts.insert(0, _front(x, front, axis, fill, axis_name, False, ctx_x))
    if back:
      flipped = jnp.flip(x, axis)  # the next device's first `back`, in order
      parts.append(jnp.flip(_front(flipped, back, axis, fill, axis_name, True), axis))
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(jnp.concatenate(parts, axis=axis), widths, constant_values=fill)

  heads_major = lambda x: jnp.swapaxes(x, 1, 2).astype(jnp.float32)
  qb = linear.to_chunks(blocks(heads_major(q), 0, 0, 0.0), w, 2)
  ctx_k = None if 'k' not in ctx else heads_major(ctx['k'])
  kp = blocks(heads_major(k), before, after, 0.0, ctx_k)
  vp = blocks(v.astype(jnp.float32), before, after, 0.0, ctx.get('v'))
  span = before + w + after
  starts = jnp.arange(n) * w
  take = lambda x: jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(x, s, span, axis=2), out_axes=2)(
    starts
  )
  kb, vb = take(kp), take(vp)  # [B, H, N, span, .]
  logits = jnp.einsum('bhntd,bhnsd->bhnts', qb, kb) * d**-0.5

  q_pos = starts[:, None] + jnp.arange(w)[None, :]  # [N, w]
  k_pos = starts[:, None] - before + jnp.arange(span)[None, :]  # [N, span]
  gap = q_pos[:, :, None] - k_pos[:, None, :]  # [N, w, span]
  near = (gap >= 0) & (gap < window) if causal else (jnp.abs(gap) < w)
  seg_q = linear.to_chunks(jnp.pad(segment_ids, ((0, 0), (0, pad))), w, 1)
  padded_seg = blocks(segment_ids, before, after, -1, ctx.get('seg'))
  valid = jnp.ones((b, length), bool) if mask is None else mask
  padded_valid = blocks(valid, before, after, False, ctx.get('valid'))  # False outside
  take_1d = lambda x: jax.vmap(
    lambda s: jax.lax.dynamic_slice_in_dim(x, s, span, axis=1), out_axes=1
  )(starts)
  seg_k, valid_k = take_1d(padded_seg), take_1d(padded_valid)  # [B, N, span]
  allowed = near[None] & (seg_q[..., :, None] == seg_k[..., None, :]) & valid_k[:, :, None, :]
  allowed = allowed[:, None]  # [B, 1, N, w, span]
  logits = jnp.where(allowed, logits, NEG)
  shift = sg(jnp.max(logits, axis=-1))
  weights = jnp.where(allowed, linear.safe_exp(logits - shift[..., None]), 0.0)
  num = jnp.einsum('bhnts,bhnsd->bhntd', weights, vb).reshape(b, h, n * w, -1)[:, :, :length]
  den = jnp.sum(weights, axis=-1).reshape(b, h, n * w)[:, :, :length]
  return num, den, shift.reshape(b, h, n * w)[:, :, :length]


def _beyond_causal(
  qf,
  kf,
  kr,
  v,
  segment_ids,
  window,
  chunk_size,
  return_state=False,
  axis_name=None,
  reverse=False,
  context=None,
  initial_state=None,
):
  """The linear part over keys j <= n - W: the causal core on keys shifted right by W
  (a causal ``context``'s keys, or the neighbouring device's, shifted in first). With
  no window (sinks alone) the keys stay in place, and the reversed pass of a
  bidirectional call leaves out the diagonal, which the forward pass counts."""
  if not window:
    return linear.causal_chunked(
      qf,
      kf,
      kr,
      v.astype(jnp.float32),
      segment_ids,
      chunk_size,
      inclusive=not reverse,
      return_shift=True,
      return_state=return_state,
      initial_state=initial_state,
      axis_name=axis_name,
      axis_reversed=reverse,
    )
  ctx = context or {}
  shift = lambda x, fill, name, axis=2: _shift_right(
    x, window, axis, fill, axis_name, reverse, ctx.get(name)
  )
  return linear.causal_chunked(
    qf,
    shift(kf, 0.0, 'kf'),
    shift(kr, NEG, 'kr'),
    shift(v.astype(jnp.float32), 0.0, 'v'),
    segment_ids,
    chunk_size,
    key_segment_ids=shift(segment_ids, None, 'seg', 1),
    return_shift=True,
    return_state=return_state,
    initial_state=initial_state,
    axis_name=axis_name,
    axis_reversed=reverse,
  )


def hybrid(
  q,
  k,
  v,
  qf,
  q_r,
  kf,
  kr,
  segment_ids,
  mask,
  log_gain,
  context=None,
  initial_state=None,
  is_sink=None,
  sink_log_gain=None,
  sinks_in=None,
  cache=None,
  far=None,
  *,
  window,
  causal,
  chunk_size,
  sinks=0,
  packed=True,
  rope_clamp=0,
  return_state=False,
  axis_name=None,
):
  """Unnormalised (num [B, H, L, D], den [B, H, L]) of windowed attention, plus
  (causal, ``return_state``) the linear state holding every key but the last W and,
  with sinks, the sink state after the last position.

  q, k [B, L, H, d] raw (k with q's heads); v [B, H, L, D]; qf, q_r the query parts
  and kf, kr the masked key parts of the feature map (``FeatureMap.query_parts``,
  ``masked_key``); log_gain [H]. ``axis_name``: inside ``shard_map`` with the
  sequence split over that axis (each device's span at least W long); the W keys
  next to each end of a span come from the neighbouring device. Causal
  continuation (a prefill after earlier tokens): ``context`` holds the ring, the W
  keys before the first position or, for a right-padded row, its last W valid keys
  ({'k' [B, W, H, d], 'v' [B, H, W, D], 'valid', 'seg' [B, W], 'kf' [B, H, W, M],
  'kr' [B, H, W]}), and ``initial_state`` the linear state of every key before those.

  Further exact parts under the same normaliser (``window`` may then be 0): with
  ``sinks`` = s, ``is_sink`` [B, L] marks the sink keys (``sinks.flags``; the caller
  has already dropped them from ``mask`` and kf, kr) and ``sinks_in`` holds the sinks
  before the first position (``sinks.attend``; ``packed``: segment ids were given),
  scored with ``sink_log_gain`` [H];
  ``cache`` is a sparse cache (``sparse_cache.read``), its keys older than every
  query and absent from the linear state, scored with the window's gain. ``far``:
  the sinks and the cache score keys ``rope_clamp`` or more back at that distance
  (``rope_clamp.py``).
  """
  if axis_name is not None and q.shape[1] < window:
    raise ValueError(
      f'attention.window={window} is longer than the {q.shape[1]} positions per device'
    )
  parts = []
  if window:
    b_num, b_den, b_shift = band(q, k, v, segment_ids, mask, window, causal, axis_name, context)
    parts.append((b_num, b_den, b_shift + log_gain[None, :, None]))
  if sinks:
    s_num, s_den, s_shift, sink_state = sinks_lib.attend(
      q,
      k,
      v,
      segment_ids,
      is_sink,
      sinks_in,
      far,
      size=sinks,
      causal=causal,
      packed=packed,
      rope_clamp=rope_clamp,
      axis_name=axis_name,
    )
    parts.append((s_num, s_den, s_shift + sink_log_gain[None, :, None]))
  if cache is not None:
    c_num, c_den, c_shift = sparse_cache.read(cache, q, far, rope_clamp)
    parts.append((c_num, c_den, c_shift + log_gain[None, :, None]))
  beyond = _beyond_causal(
    qf,
    kf,
    kr,
    v,
    segment_ids,
    window,
    chunk_size,
    return_state,
    axis_name,
    context=context,
    initial_state=initial_state,
  )
  parts.append((beyond[0], beyond[1], q_r + beyond[2]))
  if return_state:
    return linear.merge(parts) + (beyond[3],) + ((sink_state,) if sinks else ())
  if not causal:  # keys j >= n + W: the same on the reversed sequence
    flip = lambda x, axis=2: jnp.flip(x, axis=axis)
    r_num, r_den, r_shift = _beyond_causal(
      flip(qf),
      flip(kf),
      flip(kr),
      flip(v),
      flip(segment_ids, 1),
      window,
      chunk_size,
      axis_name=axis_name,
      reverse=True,
    )
    parts.append((flip(r_num), flip(r_den), q_r + flip(r_shift)))
  return linear.merge(parts)


def scores(q, k, qf, q_r, kf, kr, *, window, causal, log_gain, sink_cols=None, sink_log_gain=None):
  """[B, H, L, L] unnormalised weights the hybrid implies (analysis only): g exp(s)
  inside the window, g_s exp(s) on the sink keys ``sink_cols`` [B, L] (kf, kr zero
  there), phi(q).phi(k) elsewhere, under one shift per row."""
  length = q.shape[1]
  s = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32))
  s = s * q.shape[-1] ** -0.5
  exact_log = s + log_gain[None, :, None, None] if window else s
  lin = jnp.einsum('bhqm,bhkm->bhqk', qf, kf)
  lin_log = q_r[..., :, None] + kr[..., None, :]
  gap = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
  exact = ((gap >= 0) & (gap < window)) if causal else (jnp.abs(gap) < window)
  if sink_cols is not None:
    is_sink = sink_cols[:, None, None, :]
    exact_log = jnp.where(is_sink, s + sink_log_gain[None, :, None, None], exact_log)
    exact = exact | is_sink
  visible = gap >= 0 if causal else jnp.ones_like(gap, bool)
  log_like = jnp.where(exact, exact_log, lin_log)
  top = sg(jnp.max(jnp.where(visible, log_like, NEG), axis=-1, keepdims=True))
  return jnp.where(
    exact,
    linear.safe_exp(exact_log - top),
    lin * linear.safe_exp(lin_log - top),
  )


# --- decoding: a ring buffer of the last W raw keys and values --------------


def init_ring(
  batch, window, heads, head_dim, value_dim, dtype=jnp.float32, linear_keys=False, indexed=False
):
  """The empty ring; ``linear_keys``: it also holds each key as the feature map sees
  it ('k_linear', the key before rotary positions: ``attention.linear_nope``);
  ``indexed``: each key's index in its row ('index', for ``attention.linear_half_life``)."""
  ring = {
    'k': jnp.zeros((batch, window, heads, head_dim), dtype),
    'v': jnp.zeros((batch, window, heads, value_dim), dtype),
    'valid': jnp.zeros((batch, window), bool),
    'pos': jnp.zeros((), jnp.int32),
  }
  if linear_keys:
    ring['k_linear'] = jnp.zeros_like(ring['k'])
  if indexed:
    ring['index'] = jnp.zeros((batch, window), jnp.int32)
  return ring


def ring_ordered(ring):
  """The ring's entries ({'k', 'v', 'valid'[, 'k_linear']}) oldest first (after a
  prefill, each row's last W valid keys, behind invalid slots where it has fewer)."""
  window = ring['k'].shape[1]
  slots = jnp.mod(ring['pos'] + jnp.arange(window), window)
  return {name: x[:, slots] for name, x in ring.items() if name != 'pos'}


def last_valid(valid, window):
  """valid [B, N] -> [B, N]: the last ``window`` valid entries of each row (what a ring
  that counts keys, not positions, holds: a right-padded prompt keeps its own last W)."""
  after = jnp.cumsum(valid[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]
  return valid & (after <= window)


def ring_append(ring, entries):
  """(new ring, what leaves it) after L more tokens, ``entries`` {'k', 'v' [B, L, H, .],
  'valid' [B, L][, 'k_linear']}. The ring keeps each row's last W valid keys
  (``last_valid``: it counts keys, not positions, so a right-padded prompt keeps its
  own), oldest first from slot pos mod W so that ``ring_push`` evicts the oldest,
  behind invalid slots where a row has fewer. What leaves is ring + chunk
  [B, W + L, ...] with 'valid' marking every other valid key."""
  window = ring['k'].shape[1]
  old = ring_ordered(ring)
  joined = {n: jnp.concatenate([x, entries[n].astype(x.dtype)], axis=1) for n, x in old.items()}
  keep = last_valid(joined['valid'], window)
  # a stable sort puts the kept entries last, in their order
  order = jnp.argsort(keep, axis=1, stable=True)[:, -window:]
  pick = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
  pos = ring['pos'] + entries['k'].shape[1]
  slots = jnp.mod(pos + jnp.arange(window), window)
  place = lambda x: jnp.zeros((x.shape[0], window) + x.shape[2:], x.dtype).at[:, slots].set(x)
  kept = dict(joined, valid=keep)
  new = {n: place(pick(x)) for n, x in kept.items()}
  return dict(new, pos=pos), dict(joined, valid=joined['valid'] & ~keep)


def ring_push(ring, entries):
  """(new ring, the entry it evicts) for one token ``entries`` {'k', 'v' [B, H, .],
  'valid' [B][, 'k_linear']}: the token takes slot pos mod W, which holds the ring's
  oldest entry (a masked token takes a slot too, as it takes a position in the forward
  pass's window)."""
  slot = jnp.mod(ring['pos'], ring['k'].shape[1])
  names = [n for n in ring if n != 'pos']
  old = {n: ring[n][:, slot] for n in names}
  new = {n: ring[n].at[:, slot].set(entries[n].astype(ring[n].dtype)) for n in names}
  return dict(new, pos=ring['pos'] + 1), old


def ring_read(ring, q):
  """Exact part for one query q [B, H, d] over the ring: (num [B, H, D], den [B, H],
  shift [B, H])."""
  s = jnp.einsum('bhd,bwhd->bhw', q.astype(jnp.float32), ring['k'].astype(jnp.float32))
  s = jnp.where(ring['valid'][:, None, :], s * q.shape[-1] ** -0.5, NEG)
  shift = sg(jnp.max(s, axis=-1))
  weights = jnp.where(ring['valid'][:, None, :], linear.safe_exp(s - shift[..., None]), 0.0)
  num = jnp.einsum('bhw,bwhd->bhd', weights, ring['v'].astype(jnp.float32))
  return num, jnp.sum(weights, axis=-1), shift
