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


def safe_exp(x):
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


def bidirectional(qf, kw, v, axis_name=None):
  """Unnormalised (num, den): Z = phi(K)^T V and z = phi(K)^T 1 in O(L M D).

  kw is phi(k) up to one factor per (batch, head), which cancels; under
  sequence parallelism (``axis_name``, inside ``shard_map``) that factor must be
  the same on every device, and (Z, z) is summed across them.
  """
  context = jnp.einsum('bhlm,bhld->bhmd', kw, v.astype(jnp.float32))
  normaliser = jnp.sum(kw, axis=2)
  if axis_name is not None:
    context, normaliser = jax.lax.psum((context, normaliser), axis_name)
  num = jnp.einsum('bhlm,bhmd->bhld', qf, context)
  den = jnp.einsum('bhlm,bhm->bhl', qf, normaliser)
  return num, den


def bidirectional_segments(qf, kf, kr, v, segment_ids, chunk_size, axis_name=None):
  """Bidirectional with packed segments: a forward inclusive pass plus a
  backward exclusive pass of the causal core, merged under their common
  shift. With ``axis_name`` the backward pass runs the devices in reverse."""
  fwd = causal_chunked(
    qf, kf, kr, v, segment_ids, chunk_size, return_shift=True, axis_name=axis_name
  )
  flip = lambda x, axis=2: jnp.flip(x, axis=axis)
  bwd = causal_chunked(
    *(flip(x) for x in (qf, kf, kr, v)),
    flip(segment_ids, 1),
    chunk_size,
    inclusive=False,
    return_shift=True,
    axis_name=axis_name,
    axis_reversed=True,
  )
  return merge([fwd, tuple(flip(x) for x in bwd)])


def merge(parts):
  """Sum of unnormalised (num, den, shift) parts, each relative to exp(-shift),
  as one (num, den) relative to their common maximum."""
  top = jax.lax.stop_gradient(jnp.max(jnp.stack([p[2] for p in parts]), axis=0))
  num = den = 0.0
  for p_num, p_den, shift in parts:
    scale = safe_exp(shift - top)
    num = num + p_num * scale[..., None]
    den = den + p_den * scale
  return num, den


# --- carried states: the associative combine -------------------------------


def empty_state(batch, heads, state_size, value_dim, segment=None):
  """The identity of ``combine_states`` (from the left): no keys yet."""
  seg = jnp.zeros((batch,), jnp.int32) if segment is None else segment
  return {
    'S': jnp.zeros((batch, heads, state_size, value_dim), jnp.float32),
    'z': jnp.zeros((batch, heads, state_size), jnp.float32),
    'M': jnp.full((batch, heads), NEG, jnp.float32),
    'seg': seg,
  }


def combine_states(earlier, later):
  """The state of two adjacent spans of keys, ``earlier`` then ``later``.

  A state summarises the keys of its span's last segment: S = sum exp(r - M)
  k~ v^T, z = sum exp(r - M) k~, M their largest log-scale, seg that segment's
  id. Segments are contiguous, so the spans join when ``later`` ends in the
  segment ``earlier`` ends in; otherwise ``later`` alone is the answer. The
  combine is associative, so states of chunks, devices or conversation turns
  can be folded in any grouping. Leaves broadcast over leading axes.
  """
  joined = earlier['seg'] == later['seg']
  joined = joined.reshape(joined.shape + (1,) * (later['M'].ndim - joined.ndim))
  new_max = jnp.maximum(jnp.where(joined, earlier['M'], NEG), later['M'])
  old = jnp.where(joined, safe_exp(earlier['M'] - new_max), 0.0)
  own = safe_exp(later['M'] - new_max)
  return {
    'S': old[..., None, None] * earlier['S'] + own[..., None, None] * later['S'],
    'z': old[..., None] * earlier['z'] + own[..., None] * later['z'],
    'M': new_max,
    'seg': later['seg'],
  }


def incoming_state(local, axis_name, reversed_order=False, base=None):
  """(state before this device's span, state after every device's span), inside
  ``shard_map`` over ``axis_name``: one all-gather of the per-device states,
  then a fold of the ones before this device (after it with ``reversed_order``,
  for passes over a flipped sequence). ``base`` is the state before the first
  span. The traffic is P states, whatever the sequence length."""
  gathered = jax.lax.all_gather(local, axis_name)
  count = gathered['M'].shape[0]
  order = range(count - 1, -1, -1) if reversed_order else range(count)
  prefix = base
  if prefix is None:
    prefix = empty_state(*local['S'].shape, segment=jnp.zeros_like(local['seg']))
  before = [None] * count  # by device: the state entering its span
  for device in order:
    before[device] = prefix
    prefix = combine_states(prefix, jax.tree.map(lambda x, i=device: x[i], gathered))
  pick = lambda *xs: jnp.stack(xs)[jax.lax.axis_index(axis_name)]
  return jax.tree.map(pick, *before), prefix


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


def to_chunks(x, c, axis):
  """x with its length `axis` cut into chunks of c: [..., L, ...] -> [..., L / c, c, ...]."""
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
  initial_state=None,
  axis_name=None,
  axis_reversed=False,
):
  """Causal linear attention in chunks of C positions.

  Within a chunk: the masked quadratic form tril(q~ k~^T) V. Across chunks: an
  exclusive prefix of the per-chunk states by ``lax.scan`` and
  ``combine_states``. Memory is O(L (M + D) + (L / C) M D); no [L, M, D] tensor
  is formed.

  ``key_segment_ids`` (default: ``segment_ids``) lets the keys carry segments of
  their own, still contiguous and never ahead of the queries' (``window.py``
  passes keys shifted right by the window). ``initial_state`` (S, z, M and
  optionally seg; default: the first key's segment) continues from keys seen
  before: multi-turn or chunked prefill. ``axis_name`` (inside ``shard_map``,
  the sequence split over that mesh axis): the state entering this device's
  span comes from ``incoming_state``, and the returned state is the one after
  the whole sequence on every device. Returns unnormalised (num [B, H, L, D],
  den [B, H, L]), relative to exp(-shift) with shift [B, H, L] the largest key
  log-scale the query sees (NEG when it sees none), plus that shift with
  ``return_shift`` and the state after the last position with ``return_state``.
  """
  b, h, length, m = qf.shape
  d = v.shape[-1]
  c = max(1, min(chunk_size, length))
  pad = -length % c
  qf, kf, v = (
    to_chunks(_pad_length(x, pad, 2, 0.0), c, 2) for x in (qf, kf, v.astype(jnp.float32))
  )
  kr = to_chunks(_pad_length(kr, pad, 2, NEG), c, 2)  # [B, H, N, C]
  seg = to_chunks(_pad_length(segment_ids, pad, 1, None), c, 1)  # [B, N, C] (queries)
  kseg = seg
  if key_segment_ids is not None:
    kseg = to_chunks(_pad_length(key_segment_ids, pad, 1, None), c, 1)
  n = qf.shape[2]

  # Each chunk's own state, seen from its last key (that key's segment only);
  # segments are contiguous, so these keys form a suffix.
  seg_last = kseg[:, :, -1]  # [B, N]
  in_last = (kseg == seg_last[..., None])[:, None]  # [B, 1, N, C]
  own_max = jnp.max(jnp.where(in_last, kr, NEG), axis=3)  # [B, H, N]
  own_w = jnp.where(in_last, safe_exp(kr - own_max[..., None]), 0.0)
  kw = kf * own_w[..., None]
  own = {
    'S': jnp.einsum('bhncm,bhncd->nbhmd', kw, v),
    'z': jnp.einsum('bhncm->nbhm', kw),
    'M': jnp.moveaxis(own_max, 2, 0),
    'seg': jnp.moveaxis(seg_last, 1, 0),
  }
  # emit the state *before* each chunk: an exclusive prefix
  carry_step = lambda carry, chunk: (combine_states(carry, chunk), carry)
  final, prev = jax.lax.scan(carry_step, empty_state(b, h, m, d, kseg[:, 0, 0]), own)
  if initial_state is not None or axis_name is not None:
    base = None
    if initial_state is not None:
      base = {'seg': kseg[:, 0, 0], **initial_state}
    if axis_name is None:
      incoming, final = base, combine_states(base, final)
    else:
      incoming, final = incoming_state(final, axis_name, axis_reversed, base)
    prev = combine_states(incoming, prev)
  prev_s, prev_z = jnp.moveaxis(prev['S'], 0, 2), jnp.moveaxis(prev['z'], 0, 2)
  prev_max, prev_seg = jnp.moveaxis(prev['M'], 0, 2), jnp.moveaxis(prev['seg'], 0, 1)

  # Per-query stabiliser: max over the keys this query may see.
  tri = jnp.tril(jnp.ones((c, c), bool), 0 if inclusive else -1)
  visible = (tri & (seg[..., :, None] == kseg[..., None, :]))[:, None]
  carry_ok = (seg == prev_seg[..., None])[:, None]  # [B, 1, N, C]
  key_r = kr[..., None, :]  # [B, H, N, 1, Cs]
  intra_max = jnp.max(jnp.where(visible, key_r, NEG), axis=-1)
  q_max = jnp.maximum(intra_max, jnp.where(carry_ok, prev_max[..., None], NEG))
  weights = jnp.where(visible, safe_exp(key_r - q_max[..., None]), 0.0)
  scores = jnp.einsum('bhntm,bhnsm->bhnts', qf, kf) * weights
  carry_w = jnp.where(carry_ok, safe_exp(prev_max[..., None] - q_max), 0.0)
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
    out += ({key: final[key] for key in ('S', 'z', 'M')},)
  return out


# --- per-step recurrence: the test reference and the decoding update ---------


def init_state(batch, heads, state_size, value_dim):
  """A decoding state: ``empty_state`` without its segment id (one sequence)."""
  state = empty_state(batch, heads, state_size, value_dim)
  del state['seg']
  return state


def add_key(state, kf, kr, v):
  """The state with one more key: a rank-1 update of (S, z) with online
  rescaling. kf [B, H, M]; kr [B, H] (NEG: the key does not count); v [B, H, D]."""
  new_max = jnp.maximum(state['M'], kr)
  old, own = safe_exp(state['M'] - new_max), safe_exp(kr - new_max)
  s = old[..., None, None] * state['S'] + own[..., None, None] * kf[..., :, None] * v[..., None, :]
  z = old[..., None] * state['z'] + own[..., None] * kf
  return {'S': s, 'z': z, 'M': new_max}


def add_keys(state, kf, kr, v):
  """The state with N more keys at once, rescaled online (their order does not matter to
  a sum): kf [B, H, N, M]; kr [B, H, N] (kf = 0, kr = NEG: the key does not count);
  v [B, H, N, D]."""
  new_max = jnp.maximum(state['M'], jnp.max(kr, axis=-1))
  old, own = safe_exp(state['M'] - new_max), safe_exp(kr - new_max[..., None])
  weighted = own[..., None] * kf
  s = old[..., None, None] * state['S'] + jnp.einsum('bhnm,bhnd->bhmd', weighted, v)
  return {'S': s, 'z': old[..., None] * state['z'] + jnp.sum(weighted, axis=2), 'M': new_max}


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
