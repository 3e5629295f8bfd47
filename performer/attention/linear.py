"""The linear-attention core: bidirectional, chunkwise-parallel causal, the
per-step scan reference, and the one-token recurrent update.

Inputs are the split features of ``feature_maps``: q~ [B, L, H, M], k~ with
its log-scale r [B, L, H] (r = NEG on padded keys), values [B, L, H, D].

Causal safety. Key log-scales are stabilised by a running maximum that only
covers keys a query is allowed to see: the carried state (S, z) is stored
relative to exp(-M) with M the maximum so far, and rescaled online when M
grows, as online softmax does. Inside a chunk each query uses its own prefix
maximum, and entries above the diagonal are selected to exact zeros, so a
future key, query or value cannot change any earlier output, not even its
rounding. Exclusive prefixes over chunks come from a scan, never from
cumsum minus the own term.

Everything after the feature projection runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # log-scale of a key that must not count; finite to keep grads clean


def _safe_exp(x):
  """exp(min(x, 0)): every call site has x <= 0 where the value is used; the
  clamp keeps the unused (masked) entries finite."""
  return jnp.exp(jnp.minimum(x, 0.0))


def normalise(num, den, eps):
  """num / den with eps in the denominator, keeping its sign (trig features
  can give negative normalisers), so the result is never inf or NaN."""
  safe = jnp.where(den >= 0, den + eps, den - eps)
  return num / safe[..., None]


# --- bidirectional -----------------------------------------------------------

def bidirectional(qf, kf, kr, v):
  """Unnormalised (num, den): Z = phi(K)^T V and z = phi(K)^T 1 in O(L M D)."""
  shift = jnp.max(kr, axis=1, keepdims=True)  # one shift for all keys: cancels
  kw = kf * jnp.exp(kr - shift)[..., None]
  v = v.astype(jnp.float32)
  context = jnp.einsum("blhm,blhd->bhmd", kw, v)
  normaliser = jnp.sum(kw, axis=1)
  num = jnp.einsum("blhm,bhmd->blhd", qf, context)
  den = jnp.einsum("blhm,bhm->blh", qf, normaliser)
  return num, den


def bidirectional_segments(qf, kf, kr, v, segment_ids, chunk_size):
  """Bidirectional with packed segments: a forward inclusive pass plus a
  backward exclusive pass of the causal core, with one fixed shift per
  segment so the two halves share a scale."""
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  runs = jnp.cumsum(starts, axis=1) - 1  # [B, L] contiguous run index
  length = kr.shape[1]
  run_max = jax.vmap(lambda r, i: jax.ops.segment_max(r, i, length))(kr, runs)
  shift = jnp.take_along_axis(run_max, runs[..., None], axis=1)
  kw = kf * jnp.exp(kr - shift)[..., None]
  flat_r = jnp.where(kr > NEG / 2, 0.0, NEG)
  fwd = causal_chunked(qf, kw, flat_r, v, segment_ids, chunk_size)
  flip = lambda x: jnp.flip(x, axis=1)
  bwd = causal_chunked(flip(qf), flip(kw), flip(flat_r), flip(v),
                       flip(segment_ids), chunk_size, inclusive=False)
  return fwd[0] + flip(bwd[0]), fwd[1] + flip(bwd[1])


# --- causal, chunkwise parallel ---------------------------------------------

def _pad_to_chunks(x, pad, value):
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  if value is None:  # repeat the last entry (segment ids of padding)
    return jnp.concatenate([x, jnp.repeat(x[:, -1:], pad, axis=1)], axis=1)
  return jnp.pad(x, widths, constant_values=value)


def _chunk(x, c):
  return x.reshape(x.shape[0], x.shape[1] // c, c, *x.shape[2:])


def causal_chunked(qf, kf, kr, v, segment_ids, chunk_size, inclusive=True,
                   return_state=False):
  """Causal linear attention in chunks of C positions.

  Within a chunk: the masked quadratic form tril(q~ k~^T) V. Across chunks: an
  exclusive prefix of the per-chunk states (S, z, M) by ``lax.scan``. Memory is
  O(L (M + D) + (L / C) M D); no [L, M, D] tensor is formed.

  Returns unnormalised (num [B, L, H, D], den [B, L, H]) and, with
  ``return_state``, the state after the last position.
  """
  b, length, h, m = qf.shape
  d = v.shape[-1]
  c = max(1, min(chunk_size, length))
  pad = -length % c
  qf, kf, v = (_pad_to_chunks(x, pad, 0.0) for x in (qf, kf, v))
  kr = _pad_to_chunks(kr, pad, NEG)
  seg = _pad_to_chunks(segment_ids, pad, None)
  qf, kf, kr, v, seg = (_chunk(x, c) for x in (qf, kf, kr, v, seg))
  v = v.astype(jnp.float32)
  n = qf.shape[1]

  # Each chunk's own state, seen from its last position (that position's
  # segment only); segments are contiguous, so these keys form a suffix.
  seg_last = seg[:, :, -1]                                   # [B, N]
  in_last = (seg == seg_last[..., None])[..., None]          # [B, N, C, 1]
  own_max = jnp.max(jnp.where(in_last, kr, NEG), axis=2)     # [B, N, H]
  own_w = jnp.where(in_last, _safe_exp(kr - own_max[:, :, None]), 0.0)
  kw = kf * own_w[..., None]
  own_s = jnp.einsum("bnchm,bnchd->nbhmd", kw, v)
  own_z = jnp.einsum("bnchm->nbhm", kw)

  def carry_step(carry, chunk):
    s, z, mx, cseg = carry
    c_s, c_z, c_max, c_seg = chunk
    cont = (cseg == c_seg)[:, None]                          # [B, 1]
    new_max = jnp.maximum(jnp.where(cont, mx, NEG), c_max)
    old = jnp.where(cont, _safe_exp(mx - new_max), 0.0)
    own = _safe_exp(c_max - new_max)
    new = (old[..., None, None] * s + own[..., None, None] * c_s,
           old[..., None] * z + own[..., None] * c_z, new_max, c_seg)
    return new, carry  # emit the state *before* this chunk: exclusive prefix

  init = (jnp.zeros((b, h, m, d), jnp.float32), jnp.zeros((b, h, m),
                                                          jnp.float32),
          jnp.full((b, h), NEG, jnp.float32), seg[:, 0, 0])
  final, (prev_s, prev_z, prev_max, prev_seg) = jax.lax.scan(
      carry_step, init,
      (own_s, own_z, jnp.moveaxis(own_max, 1, 0), jnp.moveaxis(seg_last, 1, 0)))
  prev_s, prev_z = jnp.moveaxis(prev_s, 0, 1), jnp.moveaxis(prev_z, 0, 1)
  prev_max, prev_seg = jnp.moveaxis(prev_max, 0, 1), jnp.moveaxis(prev_seg, 0, 1)

  # Per-query stabiliser: max over the keys this query may see.
  tri = jnp.tril(jnp.ones((c, c), bool), 0 if inclusive else -1)
  visible = tri & (seg[..., :, None] == seg[..., None, :])   # [B, N, Ct, Cs]
  visible = visible[..., None]                               # [..., 1] heads
  carry_ok = (seg == prev_seg[..., None])[..., None]         # [B, N, C, 1]
  intra_max = jnp.max(jnp.where(visible, kr[:, :, None], NEG), axis=3)
  q_max = jnp.maximum(intra_max, jnp.where(carry_ok, prev_max[:, :, None], NEG))
  weights = jnp.where(visible,
                      _safe_exp(kr[:, :, None] - q_max[:, :, :, None]), 0.0)
  scores = jnp.einsum("bnthm,bnshm->bntsh", qf, kf) * weights
  carry_w = jnp.where(carry_ok, _safe_exp(prev_max[:, :, None] - q_max), 0.0)
  num = (jnp.einsum("bntsh,bnshd->bnthd", scores, v)
         + jnp.einsum("bnthm,bnhmd->bnthd", qf, prev_s) * carry_w[..., None])
  den = (jnp.sum(scores, axis=3)
         + jnp.einsum("bnthm,bnhm->bnth", qf, prev_z) * carry_w)
  num = num.reshape(b, n * c, h, d)[:, :length]
  den = den.reshape(b, n * c, h)[:, :length]
  if return_state:
    s, z, mx, _ = final
    return num, den, {"S": s, "z": z, "M": mx}
  return num, den


# --- per-step recurrence: the test reference and the decoding update ---------

def init_state(batch, heads, state_size, value_dim):
  return {"S": jnp.zeros((batch, heads, state_size, value_dim), jnp.float32),
          "z": jnp.zeros((batch, heads, state_size), jnp.float32),
          "M": jnp.full((batch, heads), NEG, jnp.float32)}


def recurrent_step(state, qf, kf, kr, v):
  """One token: a rank-1 update of (S, z) with online rescaling.

  qf, kf [B, H, M]; kr [B, H]; v [B, H, D]. Returns (num, den, new_state).
  """
  new_max = jnp.maximum(state["M"], kr)
  old, own = _safe_exp(state["M"] - new_max), _safe_exp(kr - new_max)
  s = (old[..., None, None] * state["S"]
       + own[..., None, None] * kf[..., :, None] * v[..., None, :])
  z = old[..., None] * state["z"] + own[..., None] * kf
  num = jnp.einsum("bhm,bhmd->bhd", qf, s)
  den = jnp.einsum("bhm,bhm->bh", qf, z)
  return num, den, {"S": s, "z": z, "M": new_max}


def causal_scan(qf, kf, kr, v, segment_ids):
  """Per-time-step ``lax.scan`` reference (slow; tests and benchmarks only)."""
  b, _, h, m = qf.shape
  v = v.astype(jnp.float32)
  starts = jnp.concatenate(
      [jnp.zeros_like(segment_ids[:, :1], bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

  def step(state, xs):
    q_t, k_t, r_t, v_t, reset = xs
    fresh = init_state(b, h, m, v.shape[-1])
    state = jax.tree.map(
        lambda f, s: jnp.where(reset.reshape((b,) + (1,) * (s.ndim - 1)), f, s),
        fresh, state)
    num, den, state = recurrent_step(state, q_t, k_t, r_t, v_t)
    return state, (num, den)

  swap = lambda x: jnp.moveaxis(x, 1, 0)
  _, (num, den) = jax.lax.scan(
      step, init_state(b, h, m, v.shape[-1]),
      tuple(swap(x) for x in (qf, kf, kr, v, starts)))
  return swap(num), swap(den)
