"""The linear-attention core: bidirectional, chunkwise-parallel causal, the
per-step scan reference, and the one-token recurrent update.

Inputs are the split features of ``feature_maps``, heads-major: q~
[B, H, L, M], k~ with its log-scale r [B, H, L] (r = NEG on padded keys),
values [B, H, L, D]; segment ids stay [B, L]. Every contraction is then a
batched matmul over (B, H) with no transposes of the large tensors.

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
  return _divide_rows(num, safe)


@jax.custom_vjp
def _divide_rows(num, den):
  """num [..., D] / den [...]. Differentiated by hand so that the backward
  reduction over D is a contraction: XLA:CPU (jaxlib 0.10) runs the autodiff
  form, sum(g * num / den**2, -1), about 50x slower on arrays with a size-1
  axis (batch 1), which made it the slowest op of bidirectional FAVOR+."""
  return num / den[..., None]


def _divide_rows_fwd(num, den):
  inv = 1.0 / den
  out = num * inv[..., None]
  return out, (out, inv)


def _divide_rows_bwd(residuals, g):
  out, inv = residuals
  return g * inv[..., None], -jnp.einsum('...d,...d->...', g, out) * inv


_divide_rows.defvjp(_divide_rows_fwd, _divide_rows_bwd)


# --- bidirectional -----------------------------------------------------------


def bidirectional(qf, kw, v):
  """Unnormalised (num, den): Z = phi(K)^T V and z = phi(K)^T 1 in O(L M D).

  kw is phi(k) up to one factor per (batch, head), which cancels.
  """
  context = jnp.einsum('bhlm,bhld->bhmd', kw, v.astype(jnp.float32))
  normaliser = jnp.sum(kw, axis=2)
  num = jnp.einsum('bhlm,bhmd->bhld', qf, context)
  den = jnp.einsum('bhlm,bhm->bhl', qf, normaliser)
  return num, den


def bidirectional_segments(qf, kf, kr, v, segment_ids, chunk_size):
  """Bidirectional with packed segments: a forward inclusive pass plus a
  backward exclusive pass of the causal core, with one fixed shift per
  segment so the two halves share a scale."""
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  runs = jnp.cumsum(starts, axis=1) - 1  # [B, L] contiguous run index
  length = kr.shape[2]
  per_row = lambda r, i: jax.ops.segment_max(r, i, length)
  run_max = jax.vmap(jax.vmap(per_row, in_axes=(0, None)))(kr, runs)
  shift = jnp.take_along_axis(run_max, jnp.broadcast_to(runs[:, None], kr.shape), axis=2)
  kw = kf * jnp.exp(kr - shift)[..., None]
  flat_r = jnp.where(kr > NEG / 2, 0.0, NEG)
  fwd = causal_chunked(qf, kw, flat_r, v, segment_ids, chunk_size)
  flip = lambda x: jnp.flip(x, axis=2)
  bwd = causal_chunked(
    flip(qf),
    flip(kw),
    flip(flat_r),
    flip(v),
    jnp.flip(segment_ids, axis=1),
    chunk_size,
    inclusive=False,
  )
  return fwd[0] + flip(bwd[0]), fwd[1] + flip(bwd[1])


# --- causal, chunkwise parallel ---------------------------------------------


def _pad_length(x, pad, axis, value):
  """Pads the length axis; value None repeats the last entry (segment ids)."""
  if pad == 0:
    return x
  if value is None:
    last = jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
    return jnp.concatenate([x, jnp.repeat(last, pad, axis=axis)], axis=axis)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _chunk(x, c, axis):
  return x.reshape(x.shape[:axis] + (x.shape[axis] // c, c) + x.shape[axis + 1 :])


def causal_chunked(
  qf,
  kf,
  kr,
  v,
  segment_ids,
  chunk_size,
  inclusive=True,
  return_state=False,
  key_segment_ids=None,
  return_shift=False,
):
  """Causal linear attention in chunks of C positions.

  Within a chunk: the masked quadratic form tril(q~ k~^T) V. Across chunks: an
  exclusive prefix of the per-chunk states (S, z, M) by ``lax.scan``. Memory is
  O(L (M + D) + (L / C) M D); no [L, M, D] tensor is formed.

  ``key_segment_ids`` (default: ``segment_ids``) lets the keys carry segments of
  their own, still contiguous and never ahead of the queries' (``window.py``
  passes keys shifted right by the window). Returns unnormalised (num [B, H, L, D],
  den [B, H, L]), relative to exp(-shift) with shift [B, H, L] the largest key
  log-scale the query sees (NEG when it sees none), plus that shift with
  ``return_shift`` and the state after the last position with ``return_state``.
  """
  b, h, length, m = qf.shape
  d = v.shape[-1]
  c = max(1, min(chunk_size, length))
  pad = -length % c
  qf, kf, v = (_chunk(_pad_length(x, pad, 2, 0.0), c, 2) for x in (qf, kf, v.astype(jnp.float32)))
  kr = _chunk(_pad_length(kr, pad, 2, NEG), c, 2)  # [B, H, N, C]
  seg = _chunk(_pad_length(segment_ids, pad, 1, None), c, 1)  # [B, N, C] (queries)
  kseg = (
    seg if key_segment_ids is None else _chunk(_pad_length(key_segment_ids, pad, 1, None), c, 1)
  )
  n = qf.shape[2]

  # Each chunk's own state, seen from its last key (that key's segment only);
  # segments are contiguous, so these keys form a suffix.
  seg_last = kseg[:, :, -1]  # [B, N]
  in_last = (kseg == seg_last[..., None])[:, None]  # [B, 1, N, C]
  own_max = jnp.max(jnp.where(in_last, kr, NEG), axis=3)  # [B, H, N]
  own_w = jnp.where(in_last, _safe_exp(kr - own_max[..., None]), 0.0)
  kw = kf * own_w[..., None]
  own_s = jnp.einsum('bhncm,bhncd->nbhmd', kw, v)
  own_z = jnp.einsum('bhncm->nbhm', kw)

  def carry_step(carry, chunk):
    s, z, mx, cseg = carry
    c_s, c_z, c_max, c_seg = chunk
    cont = (cseg == c_seg)[:, None]  # [B, 1]
    new_max = jnp.maximum(jnp.where(cont, mx, NEG), c_max)
    old = jnp.where(cont, _safe_exp(mx - new_max), 0.0)
    own = _safe_exp(c_max - new_max)
    new = (
      old[..., None, None] * s + own[..., None, None] * c_s,
      old[..., None] * z + own[..., None] * c_z,
      new_max,
      c_seg,
    )
    return new, carry  # emit the state *before* this chunk: exclusive prefix

  init = (
    jnp.zeros((b, h, m, d), jnp.float32),
    jnp.zeros((b, h, m), jnp.float32),
    jnp.full((b, h), NEG, jnp.float32),
    kseg[:, 0, 0],
  )
  final, (prev_s, prev_z, prev_max, prev_seg) = jax.lax.scan(
    carry_step, init, (own_s, own_z, jnp.moveaxis(own_max, 2, 0), jnp.moveaxis(seg_last, 1, 0))
  )
  prev_s, prev_z = jnp.moveaxis(prev_s, 0, 2), jnp.moveaxis(prev_z, 0, 2)
  prev_max, prev_seg = jnp.moveaxis(prev_max, 0, 2), jnp.moveaxis(prev_seg, 0, 1)

  # Per-query stabiliser: max over the keys this query may see.
  tri = jnp.tril(jnp.ones((c, c), bool), 0 if inclusive else -1)
  visible = (tri & (seg[..., :, None] == kseg[..., None, :]))[:, None]
  carry_ok = (seg == prev_seg[..., None])[:, None]  # [B, 1, N, C]
  key_r = kr[..., None, :]  # [B, H, N, 1, Cs]
  intra_max = jnp.max(jnp.where(visible, key_r, NEG), axis=-1)
  q_max = jnp.maximum(intra_max, jnp.where(carry_ok, prev_max[..., None], NEG))
  weights = jnp.where(visible, _safe_exp(key_r - q_max[..., None]), 0.0)
  scores = jnp.einsum('bhntm,bhnsm->bhnts', qf, kf) * weights
  carry_w = jnp.where(carry_ok, _safe_exp(prev_max[..., None] - q_max), 0.0)
  num = (
    jnp.einsum('bhnts,bhnsd->bhntd', scores, v)
    + jnp.einsum('bhntm,bhnmd->bhntd', qf, prev_s) * carry_w[..., None]
  )
  den = jnp.sum(scores, axis=-1) + jnp.einsum('bhntm,bhnm->bhnt', qf, prev_z) * carry_w
  num = num.reshape(b, h, n * c, d)[:, :, :length]
  den = den.reshape(b, h, n * c)[:, :, :length]
  out = (num, den)
  if return_shift:
    out += (q_max.reshape(b, h, n * c)[:, :, :length],)
  if return_state:
    s, z, mx, _ = final
    out += ({'S': s, 'z': z, 'M': mx},)
  return out


# --- per-step recurrence: the test reference and the decoding update ---------


def init_state(batch, heads, state_size, value_dim):
  return {
    'S': jnp.zeros((batch, heads, state_size, value_dim), jnp.float32),
    'z': jnp.zeros((batch, heads, state_size), jnp.float32),
    'M': jnp.full((batch, heads), NEG, jnp.float32),
  }


def add_key(state, kf, kr, v):
  """The state with one more key: a rank-1 update of (S, z) with online
  rescaling. kf [B, H, M]; kr [B, H] (NEG: the key does not count); v [B, H, D]."""
  new_max = jnp.maximum(state['M'], kr)
  old, own = _safe_exp(state['M'] - new_max), _safe_exp(kr - new_max)
  s = old[..., None, None] * state['S'] + own[..., None, None] * kf[..., :, None] * v[..., None, :]
  z = old[..., None] * state['z'] + own[..., None] * kf
  return {'S': s, 'z': z, 'M': new_max}


def read_state(state, qf):
  """(num [B, H, D], den [B, H]) of query features qf [B, H, M], relative to exp(-M)."""
  return jnp.einsum('bhm,bhmd->bhd', qf, state['S']), jnp.einsum('bhm,bhm->bh', qf, state['z'])


def recurrent_step(state, qf, kf, kr, v):
  """One token: add its key, then read with its query. Returns (num, den, new_state)."""
  state = add_key(state, kf, kr, v)
  return read_state(state, qf) + (state,)


def causal_scan(qf, kf, kr, v, segment_ids):
  """Per-time-step ``lax.scan`` reference (slow; tests and benchmarks only)."""
  b, h, _, m = qf.shape
  v = v.astype(jnp.float32)
  starts = jnp.concatenate(
    [jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )

  def step(state, xs):
    q_t, k_t, r_t, v_t, reset = xs
    fresh = init_state(b, h, m, v.shape[-1])
    state = jax.tree.map(
      lambda f, s: jnp.where(reset.reshape((b,) + (1,) * (s.ndim - 1)), f, s), fresh, state
    )
    num, den, state = recurrent_step(state, q_t, k_t, r_t, v_t)
    return state, (num, den)

  time_major = lambda x: jnp.moveaxis(x, 2, 0)
  _, (num, den) = jax.lax.scan(
    step,
    init_state(b, h, m, v.shape[-1]),
    tuple(time_major(x) for x in (qf, kf, kr, v)) + (starts.T,),
  )
  return jnp.moveaxis(num, 0, 2), jnp.moveaxis(den, 0, 2)
