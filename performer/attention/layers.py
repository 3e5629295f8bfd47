"""Attention modules behind one call signature.

    attn = attention.build("favor_softmax", head_dim=64, num_heads=8, rngs=rngs)
    out = attn(q, k, v, causal=True, mask=None, segment_ids=None)

``linear_qk`` (every call takes it): the (q, k) the feature maps see when they differ
from the exact parts' (``attention.linear_nope``: q, k before rotary positions);
kinds without a feature map ignore it.

An attention module owns whatever its kind needs (a feature map with its
random matrix, trainable parameters or running statistics) and keeps the
kind's numerics behind ``__call__`` and the three decoding calls
(``init_state``, ``prefill``, ``step``), so a model holds one and never
branches on the kind. ``LinearAttention`` runs any feature map through the
pure functions of ``linear.py``; ``hybrid.HybridAttention`` adds exact parts
(a window, sinks, a sparse cache) to it.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from performer.attention import context_parallel, linear
from performer.attention import softmax as softmax_lib
from performer.attention.feature_map import Options


def check_inputs(q, k, v, mask, segment_ids):
  """Raises ValueError naming the first shape problem."""
  for name, x in (('q', q), ('k', k), ('v', v)):
    if x.ndim != 4:
      raise ValueError(f'{name} must be [batch, length, heads, dim], got shape {x.shape}')
  if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(
      f'q {q.shape} and k {k.shape} must match in batch, length and head_dim, and '
      "k's heads must divide q's (grouped-query attention)"
    )
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f'v {v.shape} does not match k {k.shape} in batch, length or heads')
  expected = q.shape[:2]
  if mask is not None:
    if mask.shape != expected:
      raise ValueError(f'mask must have shape [batch, length] = {expected}, got {mask.shape}')
    if mask.dtype != jnp.bool_:
      raise ValueError(f'mask must be bool (True = real token), got {mask.dtype}')
  if segment_ids is not None:
    if segment_ids.shape != expected:
      raise ValueError(
        f'segment_ids must have shape [batch, length] = {expected}, got {segment_ids.shape}'
      )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f'segment_ids must be integers, got {segment_ids.dtype}')


def linear_inputs(q, k, linear_qk):
  """(q, k with q's heads) for the feature map: ``linear_qk`` when given, else q, k."""
  q_lin, k_lin = (q, k) if linear_qk is None else linear_qk
  return q_lin, repeat_kv(k_lin, q.shape[-2])


def far_kwargs(far_q):
  """``far_q`` as a keyword for the calls of a kind that takes it (``rope_clamp``)."""
  return {} if far_q is None else {'far_q': far_q}


def repeat_kv(x, num_heads):
  """[..., K, D] key/value heads -> [..., num_heads, D]: query head h reads kv head
  h // (num_heads // K), HF's `repeat_kv` order."""
  groups = num_heads // x.shape[-2]
  return x if groups == 1 else jnp.repeat(x, groups, axis=-2)


def zero_padded_queries(out, mask):
  """out [B, L, H, D] with the rows of padded queries (mask False) set to zero."""
  if mask is None:
    return out
  return jnp.where(mask[..., None, None], out, jnp.zeros((), out.dtype))


def _allowed(length, causal, mask, segment_ids):
  allowed = softmax_lib.combined_mask(length, causal=causal, mask=mask, segment_ids=segment_ids)
  if mask is not None:  # padded queries: empty rows
    allowed = allowed & mask[:, None, :, None]
  return allowed


class Attention(nnx.Module):
  """Base class: one signature for every kind."""

  name = 'base'

  def __init__(
    self,
    head_dim: int,
    num_heads: int,
    options: Options,
    *,
    rngs: nnx.Rngs | None = None,
    projection=None,
  ):
    del rngs, projection
    self.head_dim, self.num_heads = head_dim, num_heads
    self.options = options

  # A hybrid with ``attention.rope_clamp`` scores its far exact keys from the queries
  # rotated to this distance (``rope_clamp.py``), which every call then takes as
  # ``far_q``; 0: a kind that needs none (and gets none).
  rope_clamp = 0

  def __call__(self, q, k, v, *, causal, mask=None, segment_ids=None, linear_qk=None, far_q=None):
    check_inputs(q, k, v, mask, segment_ids)
    if linear_qk is not None:
      check_inputs(*linear_qk, v, mask, segment_ids)
    out = self._attend(
      q,
      k,
      v,
      causal=causal,
      mask=mask,
      segment_ids=segment_ids,
      linear_qk=linear_qk,
      **far_kwargs(far_q),
    )
    return zero_padded_queries(out, mask)

  def weights(self, q, k, *, causal, mask=None, segment_ids=None, linear_qk=None):
    """The [B, H, L, L] attention matrix this kind implies (analysis only):
    out = weights @ v. Rows of padded queries are zero."""
    allowed = _allowed(q.shape[1], causal, mask, segment_ids)
    k = repeat_kv(k, q.shape[2])
    scores = jnp.where(
      allowed,
      self._scores(q, k, causal=causal, mask=mask, segment_ids=segment_ids, linear_qk=linear_qk),
      0.0,
    )
    total = jnp.sum(scores, axis=-1, keepdims=True)
    return scores / jnp.where(total == 0, 1.0, total)

  # Recurrent decoding: init_state, then prefill and/or one step per token. k and v
  # may have fewer heads than q (grouped-query attention), here as in __call__.
  def init_state(self, batch, value_dim, *, num_kv_heads=None, max_length=None, dtype=jnp.float32):
    """The empty decoding state; a KV cache holds `num_kv_heads` (default: all) heads."""
    raise NotImplementedError

  def prefill(self, state, q, k, v, *, mask=None, linear_qk=None):
    """Causal pass over a prompt; returns (out, state for the next token)."""
    raise NotImplementedError

  def step(self, state, q, k, v, *, mask=None, linear_qk=None):
    """One token, q/k [B, H, D], v [B, H, Dv]; returns (out, new state)."""
    raise NotImplementedError


class SoftmaxAttention(Attention):
  """Exact attention; decodes with a KV cache."""

  name = 'softmax'

  def _attend(self, q, k, v, *, causal, mask, segment_ids, linear_qk=None):
    del linear_qk  # no feature map
    if context_parallel.active():  # K and V gathered over the `seq` axis
      attend = functools.partial(
        softmax_lib.attend_masked,
        implementation=None
        if self.options.implementation == 'reference'
        else self.options.implementation,
      )
      return context_parallel.gathered_softmax(
        q, k, v, causal=causal, mask=mask, segment_ids=segment_ids, attend=attend
      )
    if self.options.implementation == 'reference':
      k, v = repeat_kv(k, q.shape[2]), repeat_kv(v, q.shape[2])
      out = softmax_lib.softmax_reference(
        q, k, v, causal=causal, mask=mask, segment_ids=segment_ids
      )
      return out.astype(v.dtype)
    return softmax_lib.softmax_fast(
      q,
      k,
      v,
      causal=causal,
      mask=mask,
      segment_ids=segment_ids,
      implementation=self.options.implementation,
    )

  def _scores(self, q, k, *, causal, mask, segment_ids, linear_qk=None):
    logits = (
      jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32))
      * q.shape[-1] ** -0.5
    )
    allowed = _allowed(q.shape[1], causal, mask, segment_ids)
    logits = jnp.where(allowed, logits, -1e30)
    return jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))

  def init_state(self, batch, value_dim, *, num_kv_heads=None, max_length=None, dtype=jnp.float32):
    if max_length is None:
      raise ValueError('softmax decoding keeps a KV cache: pass max_length')
    heads = num_kv_heads or self.num_heads
    return softmax_lib.init_cache(batch, heads, self.head_dim, value_dim, max_length, dtype)

  def prefill(self, state, q, k, v, *, mask=None, linear_qk=None):
    check_inputs(q, k, v, mask, None)
    mask = jnp.ones(q.shape[:2], bool) if mask is None else mask
    implementation = self.options.implementation
    implementation = None if implementation == 'reference' else implementation
    out, state = softmax_lib.cache_prefill(state, q, k, v, mask, implementation)
    return zero_padded_queries(out.astype(v.dtype), mask), state

  def step(self, state, q, k, v, *, mask=None, linear_qk=None):
    mask = jnp.ones(q.shape[:1], bool) if mask is None else mask
    out, state = softmax_lib.cache_step(state, q, k, v, mask)
    return out.astype(v.dtype), state


class IdentityAttention(Attention):
  """Returns v: the 'dummy attention' lower bound used by benchmarks."""

  name = 'identity'

  def _attend(self, q, k, v, *, causal, mask, segment_ids, linear_qk=None):
    return repeat_kv(v, q.shape[2])

  def _scores(self, q, k, **unused):
    b, length, h, _ = q.shape
    return jnp.broadcast_to(jnp.eye(length, dtype=jnp.float32), (b, h, length, length))

  def init_state(self, *args, **kwargs):
    return {}

  def prefill(self, state, q, k, v, *, mask=None, linear_qk=None):
    return zero_padded_queries(repeat_kv(v, q.shape[2]), mask), state

  def step(self, state, q, k, v, *, mask=None, linear_qk=None):
    return repeat_kv(v, q.shape[1]), state


class LinearAttention(Attention):
  """Feature-map attention: ``feature_map`` (a module of its own, see
  ``feature_map.py``) through the pure functions of ``linear.py``. A window, sinks
  or a sparse cache make it a ``hybrid.HybridAttention``, chosen by the registry."""

  def __init__(self, map_class, name, head_dim, num_heads, options, *, rngs=None, projection=None):
    super().__init__(head_dim, num_heads, options)
    self.name = name
    if options.causal_impl not in ('chunked', 'scan'):
      raise ValueError(f"causal_impl must be 'chunked' or 'scan', got {options.causal_impl!r}")
    self.feature_map = map_class(head_dim, num_heads, options, rngs=rngs, projection=projection)

  def _split(self, q, k, *, causal, mask, segment_ids):
    """Heads-major q~ [B, H, L, M], masked k~ and its log-scale [B, H, L]."""
    fmap = self.feature_map
    ctx = fmap.calibrate(q, k, causal=causal, mask=mask, segment_ids=segment_ids)
    return (fmap.query(q, ctx),) + fmap.masked_key(k, mask, ctx)

  def _output(self, num, den, v):
    """Normalises and returns to the caller's [B, L, H, D] layout."""
    eps = self.options.eps
    return linear.normalise(num, den, eps).swapaxes(1, 2).astype(v.dtype)

  def _attend(self, q, k, v, *, causal, mask, segment_ids, linear_qk=None):
    q, k = linear_inputs(q, k, linear_qk)  # no exact part: the feature map sees all
    v = repeat_kv(v, q.shape[2]).swapaxes(1, 2)  # [B, H, L, D]: small next to the features
    fmap, chunk = self.feature_map, self.options.chunk_size
    if not causal and segment_ids is None:
      ctx = fmap.calibrate(q, k, causal=False, mask=mask)
      kw = fmap.shared_key(k, mask, ctx)  # one shift for the whole sequence
      num, den = context_parallel.over_length(
        linear.bidirectional, (fmap.query(q, ctx), kw, v), (2, 2, 2), (2, 2)
      )
      return self._output(num, den, v)
    qf, kf, kr = self._split(q, k, causal=causal, mask=mask, segment_ids=segment_ids)
    seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    if causal and self.options.causal_impl == 'scan':  # the per-step reference
      return self._output(*linear.causal_scan(qf, kf, kr, v, seg), v)
    core = linear.causal_chunked if causal else linear.bidirectional_segments
    num, den = context_parallel.over_length(
      functools.partial(core, chunk_size=chunk), (qf, kf, kr, v, seg), (2, 2, 2, 2, 1), (2, 2)
    )
    return self._output(num, den, v)

  def features(self, q, k, *, causal, mask=None, segment_ids=None, linear_qk=None):
    """(phi(q), phi(k)) [B, L, H, M] with their true scale, calibrated as the
    attention call would be: phi(q).phi(k) estimates the kind's kernel."""
    fmap, (q, k) = self.feature_map, linear_inputs(q, k, linear_qk)
    ctx = fmap.calibrate(q, k, causal=causal, mask=mask, segment_ids=segment_ids)
    return (fmap.exact_query(q, ctx).swapaxes(1, 2), fmap.exact_key(k, ctx).swapaxes(1, 2))

  def _scores(self, q, k, *, causal, mask, segment_ids, linear_qk=None):
    phi_q, phi_k = self.features(
      q, k, causal=causal, mask=mask, segment_ids=segment_ids, linear_qk=linear_qk
    )
    return jnp.einsum('bqhm,bkhm->bhqk', phi_q, phi_k)

  def init_state(self, batch, value_dim, *, num_kv_heads=None, max_length=None, dtype=jnp.float32):
    del num_kv_heads, max_length, dtype  # one (S, z) per query head, whatever the context
    return linear.init_state(batch, self.num_heads, self.feature_map.num_features, value_dim)

  def prefill(self, state, q, k, v, *, mask=None, linear_qk=None):
    """Chunked causal pass that continues from ``state`` (fresh from ``init_state``,
    or an earlier prefill's or step's: multi-turn or chunked prefill) and returns
    the state after the last token."""
    check_inputs(q, k, v, mask, None)
    q, k = linear_inputs(q, k, linear_qk)
    v = repeat_kv(v, q.shape[2])
    qf, kf, kr = self._split(q, k, causal=True, mask=mask, segment_ids=None)
    seg = jnp.zeros(q.shape[:2], jnp.int32)
    core = functools.partial(
      linear.causal_chunked, chunk_size=self.options.chunk_size, return_state=True
    )

    def continued(qf, kf, kr, v, seg, state, axis_name):
      return core(qf, kf, kr, v, seg, initial_state=state, axis_name=axis_name)

    num, den, state = context_parallel.over_length(
      continued, (qf, kf, kr, v.swapaxes(1, 2), seg, state), (2, 2, 2, 2, 1, None), (2, 2, None)
    )
    return zero_padded_queries(self._output(num, den, v), mask), state

  def step(self, state, q, k, v, *, mask=None, linear_qk=None):
    q, k = linear_inputs(q, k, linear_qk)
    v = repeat_kv(v, q.shape[1])
    qf, kf, kr = self._split(
      q[:, None],
      k[:, None],
      causal=True,
      mask=None if mask is None else mask[:, None],
      segment_ids=None,
    )
    num, den, state = linear.recurrent_step(state, qf[:, :, 0], kf[:, :, 0], kr[:, :, 0], v)
    return linear.normalise(num, den, self.options.eps).astype(v.dtype), state
