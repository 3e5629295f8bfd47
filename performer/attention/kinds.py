"""Attention kinds behind one call signature, and the registry that picks one.

    attend = get_attention("favor_softmax", num_features=256, chunk_size=128)
    out = attend(q, k, v, causal=True, mask=None, segment_ids=None, features=w)

Every kind accepts every option in ``OPTIONS`` (a kind ignores the ones it has
no use for), so a config can switch kinds by changing only the name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from performer.attention import features as features_lib
from performer.attention import linear
from performer.attention import softmax as softmax_lib
from performer.attention.feature_maps import FEATURE_MAPS

OPTIONS = {
    "num_features": 256,      # m, random features (FAVOR kinds)
    "chunk_size": 128,        # causal chunk length C
    "orthogonal": True,       # orthogonal random features
    "feature_norms": "chi",   # 'chi' or 'sqrt' row norms
    "eps": 1e-6,              # added to the normaliser (sign-preserving)
    "causal_impl": "chunked",  # 'chunked' or 'scan' (per-step reference)
    "implementation": None,   # softmax: None, 'xla', 'cudnn' or 'reference'
}


def _unwrap(x):
  return x[...] if isinstance(x, nnx.Variable) else x


def _check_inputs(q, k, v, mask, segment_ids):
  """Raises ValueError naming the first shape problem."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, length, heads, dim], "
                       f"got shape {x.shape}")
  if q.shape != k.shape:
    raise ValueError(f"q and k shapes differ: q {q.shape}, k {k.shape} "
                     "(batch, length, heads and head_dim must match)")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v {v.shape} does not match q {q.shape} in batch, "
                     "length or heads")
  expected = q.shape[:2]
  if mask is not None:
    if mask.shape != expected:
      raise ValueError(f"mask must have shape [batch, length] = {expected}, "
                       f"got {mask.shape}")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be bool (True = real token), got {mask.dtype}")
  if segment_ids is not None:
    if segment_ids.shape != expected:
      raise ValueError(f"segment_ids must have shape [batch, length] = "
                       f"{expected}, got {segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")


def _zero_padded_queries(out, mask):
  if mask is None:
    return out
  return jnp.where(mask[..., None, None], out, jnp.zeros((), out.dtype))


class Attention:
  """Base class: one signature for every kind."""
  name = "base"
  uses_features = False

  def __init__(self, **options):
    self.options = {**OPTIONS, **options}
    for key, value in self.options.items():
      setattr(self, key, value)

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r}, {self.options})"

  def make_features(self, key, head_dim, num_heads=None):
    del key, head_dim, num_heads
    return None

  def __call__(self, q, k, v, *, causal, mask=None, segment_ids=None,
               features=None):
    _check_inputs(q, k, v, mask, segment_ids)
    return _zero_padded_queries(
        self._attend(q, k, v, causal=causal, mask=mask,
                     segment_ids=segment_ids, features=_unwrap(features)),
        mask)

  # Recurrent decoding: init_state, then prefill and/or one step per token.
  def init_state(self, batch, num_heads, head_dim, value_dim, *,
                 features=None, max_length=None, dtype=jnp.float32):
    raise NotImplementedError

  def prefill(self, state, q, k, v, *, features=None, mask=None):
    """Causal pass over a prompt; returns (out, state for the next token)."""
    raise NotImplementedError

  def step(self, state, q, k, v, *, features=None, mask=None):
    """One token, q/k [B, H, D], v [B, H, Dv]; returns (out, new state)."""
    raise NotImplementedError


class SoftmaxAttention(Attention):
  name = "softmax"

  def _attend(self, q, k, v, *, causal, mask, segment_ids, features):
    del features
    if self.implementation == "reference":
      out = softmax_lib.softmax_reference(q, k, v, causal=causal, mask=mask,
                                          segment_ids=segment_ids)
      return out.astype(v.dtype)
    return softmax_lib.softmax_fast(q, k, v, causal=causal, mask=mask,
                                    segment_ids=segment_ids,
                                    implementation=self.implementation)

  def init_state(self, batch, num_heads, head_dim, value_dim, *,
                 features=None, max_length=None, dtype=jnp.float32):
    if max_length is None:
      raise ValueError("softmax decoding keeps a KV cache: pass max_length")
    return softmax_lib.init_cache(batch, num_heads, head_dim, value_dim,
                                  max_length, dtype)

  def prefill(self, state, q, k, v, *, features=None, mask=None):
    mask = jnp.ones(q.shape[:2], bool) if mask is None else mask
    out = self(q, k, v, causal=True, mask=mask)
    return out, softmax_lib.prefill_cache(state, k, v, mask)

  def step(self, state, q, k, v, *, features=None, mask=None):
    mask = jnp.ones(q.shape[:1], bool) if mask is None else mask
    out, state = softmax_lib.cache_step(state, q, k, v, mask)
    return out.astype(v.dtype), state


class IdentityAttention(Attention):
  """Returns v: the 'dummy attention' lower bound used by benchmarks."""
  name = "identity"

  def _attend(self, q, k, v, *, causal, mask, segment_ids, features):
    return v

  def init_state(self, *args, **kwargs):
    return {}

  def prefill(self, state, q, k, v, *, features=None, mask=None):
    return _zero_padded_queries(v, mask), state

  def step(self, state, q, k, v, *, features=None, mask=None):
    return v, state


class LinearAttention(Attention):
  """FAVOR+ and other feature-map attention through ``linear.py``."""

  def __init__(self, name, **options):
    super().__init__(**options)
    self.name = name
    self.feature_map = FEATURE_MAPS[name]
    self.uses_features = self.feature_map.uses_features
    if self.causal_impl not in ("chunked", "scan"):
      raise ValueError(f"causal_impl must be 'chunked' or 'scan', "
                       f"got {self.causal_impl!r}")

  def make_features(self, key, head_dim, num_heads=None):
    if not self.uses_features:
      return None
    return features_lib.draw_features(
        key, self.num_features, head_dim, orthogonal=self.orthogonal,
        feature_norms=self.feature_norms, num_heads=num_heads)

  def _check_features(self, features, q):
    if not self.uses_features:
      return None
    if features is None:
      raise ValueError(f"{self.name} needs a random feature matrix: pass "
                       "features=attention.draw_features(...)")
    heads, head_dim = q.shape[-2], q.shape[-1]
    if features.ndim not in (2, 3) or features.shape[-1] != head_dim or (
        features.ndim == 3 and features.shape[0] != heads):
      raise ValueError(f"features must be [m, {head_dim}] or [{heads}, m, "
                       f"{head_dim}], got {features.shape}")
    return features

  def _split_features(self, q, k, mask, features):
    """Heads-major q~ [B, H, L, M], masked k~ and its log-scale [B, H, L]."""
    qf = self.feature_map.query(q, features)
    kf, kr = self.feature_map.masked_key(k, features, mask)
    return qf, kf, kr

  def _output(self, num, den, v):
    """Normalises and returns to the caller's [B, L, H, D] layout."""
    return linear.normalise(num, den, self.eps).swapaxes(1, 2).astype(v.dtype)

  def _attend(self, q, k, v, *, causal, mask, segment_ids, features):
    features = self._check_features(features, q)
    v = v.swapaxes(1, 2)  # [B, H, L, D]: small next to the features
    if not causal and segment_ids is None:
      qf = self.feature_map.query(q, features)
      kw = self.feature_map.shared_key(k, features, mask)
      return self._output(*linear.bidirectional(qf, kw, v), v)
    qf, kf, kr = self._split_features(q, k, mask, features)
    if causal:
      seg = (jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None
             else segment_ids)
      if self.causal_impl == "scan":
        num, den = linear.causal_scan(qf, kf, kr, v, seg)
      else:
        num, den = linear.causal_chunked(qf, kf, kr, v, seg, self.chunk_size)
    else:
      num, den = linear.bidirectional_segments(qf, kf, kr, v, segment_ids,
                                               self.chunk_size)
    return self._output(num, den, v)

  def init_state(self, batch, num_heads, head_dim, value_dim, *,
                 features=None, max_length=None, dtype=jnp.float32):
    features = _unwrap(features)
    num_random = features.shape[-2] if features is not None else head_dim
    size = self.feature_map.state_size(num_random, head_dim)
    return linear.init_state(batch, num_heads, size, value_dim)

  def prefill(self, state, q, k, v, *, features=None, mask=None):
    """Chunked causal pass that also returns the carried (S, z, M).

    ``state`` must be fresh from ``init_state`` (prefill starts a sequence).
    """
    del state
    _check_inputs(q, k, v, mask, None)
    features = self._check_features(_unwrap(features), q)
    qf, kf, kr = self._split_features(q, k, mask, features)
    seg = jnp.zeros(q.shape[:2], jnp.int32)
    num, den, state = linear.causal_chunked(qf, kf, kr, v.swapaxes(1, 2), seg,
                                            self.chunk_size, return_state=True)
    return _zero_padded_queries(self._output(num, den, v), mask), state

  def step(self, state, q, k, v, *, features=None, mask=None):
    features = self._check_features(_unwrap(features), q[:, None])
    qf, kf, kr = self._split_features(
        q[:, None], k[:, None], None if mask is None else mask[:, None],
        features)
    num, den, state = linear.recurrent_step(state, qf[:, :, 0], kf[:, :, 0],
                                            kr[:, :, 0], v)
    return linear.normalise(num, den, self.eps).astype(v.dtype), state


KINDS = ("softmax", "favor_softmax", "favor_hyperbolic", "favor_trig",
         "favor_relu", "linear_elu", "identity")


def get_attention(kind: str, **options) -> Attention:
  """Returns the attention function registered under ``kind``."""
  if kind not in KINDS:
    raise ValueError(f"unknown attention kind {kind!r}; valid kinds: "
                     f"{', '.join(KINDS)}")
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(f"unknown attention option(s) {unknown} for {kind!r}; "
                     f"valid options: {', '.join(OPTIONS)}")
  if options.get("feature_norms", "chi") not in features_lib.FEATURE_NORMS:
    raise ValueError(f"feature_norms must be one of "
                     f"{features_lib.FEATURE_NORMS}, got "
                     f"{options['feature_norms']!r}")
  if kind == "softmax":
    return SoftmaxAttention(**options)
  if kind == "identity":
    return IdentityAttention(**options)
  return LinearAttention(kind, **options)
