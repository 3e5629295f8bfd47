"""Feature maps phi for linear attention: modules that own their variables.

A feature map is an ``nnx.Module`` built once per attention layer. It may own
three kinds of variable, each a type of its own so that training treats them
differently without knowing the map:

* ``RandomProjection`` (features.py): random projections, redrawn on schedule
  by the training loop, checkpointed, never trained;
* ``FeatureParam``: trainable parameters (Hedgehog's W). An ``nnx.Param``, so
  the optimizer trains it; a pretrained softmax checkpoint never holds one, so
  importers and ``init_from`` keep its initial value and report it as
  expected-missing;
* ``FeatureStats``: running statistics (FAVOR++'s moments), updated by train
  steps (``use_running_average=False``), frozen in eval and decoding,
  checkpointed.

Every map answers in numerically safe parts from which phi(q).phi(k) is
rebuilt exactly; ``ctx`` is what ``calibrate`` derived from the data (None for
maps that need nothing):

* ``query(x, ctx)`` -> q~ [B, H, L, M]: phi(q) up to a per-token positive
  factor, harmless because it cancels between a query's numerator and
  normaliser;
* ``key(x, ctx)`` -> (k~ [B, H, L, M], r [B, H, L]): phi(k) = k~ exp(r) const
  with k~ bounded. The log-scale r is never divided out per token (that would
  reweight keys); ``linear.py`` handles it with a running maximum that never
  looks ahead;
* ``shared_key(x, mask, ctx)``: phi(k) times one positive factor per
  (batch, head), zero on masked keys, for bidirectional attention;
* ``exact_query`` / ``exact_key``: phi with its true scale, for tests,
  notebooks and attention maps.

Inputs are [B, L, H, d]; outputs are heads-major, [B, H, L, M]: the
projection writes that layout for free, and every later contraction is a
plain batched matmul over (B, H). Queries and keys are scaled by d**-0.25 so
that phi(q).phi(k) estimates exp(q.k / sqrt(d)).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from performer.attention import projection as projection_lib
from performer.attention.linear import NEG

sg = jax.lax.stop_gradient


class FeatureParam(nnx.Param):
  """A trainable feature-map parameter; never in a pretrained checkpoint."""


class FeatureStats(nnx.Variable):
  """Running statistics of a feature map: updated in training, frozen in eval
  and decoding, checkpointed; not a Param, so no gradient and no optimizer."""


@dataclasses.dataclass(frozen=True)
class Options:
  """Every attention option, with its default. Every kind accepts all of
  them (a kind ignores the ones it has no use for), so a config switches kinds
  by changing only the name."""

  num_features: int = 256  # m, random features (FAVOR kinds)
  chunk_size: int = 128  # causal chunk length C
  orthogonal: bool = True  # orthogonal random features
  feature_norms: str = 'chi'  # 'chi' or 'sqrt' row norms
  eps: float = 1e-6  # added to the normaliser (sign-preserving)
  causal_impl: str = 'chunked'  # 'chunked' or 'scan' (per-step reference)
  implementation: str | None = None  # softmax: None, 'xla', 'cudnn', 'reference'
  per_head_features: bool = False  # one random matrix per head
  stats_decay: float = 0.99  # FAVOR++/FAVOR#: running-moment decay
  hedgehog_dim: int | None = None  # Hedgehog d' (None or 0: head_dim)
  window: int = 0  # exact softmax over the last W keys, linear beyond (0: off; window.py)
  window_off: bool = False  # ablation: drop a hybrid's window branch (and its sparse cache)
  sinks: int = 0  # the first s tokens of each segment attended exactly (0: off; sinks.py)
  sparse_cache: int = 0  # LoLA: up to this many exact pairs beyond the window (sparse_cache.py)
  sparse_cache_dtype: str = ''  # the cache's storage: '' (the state's dtype) or 'bfloat16', ...
  sparse_cache_leave_one_out: bool = False  # score a pair against the state + other candidates
  linear_nope: bool = False  # the feature map sees q, k before rotary positions
  linear_half_life: int = 0  # a hybrid's linear part decays keys by half every N tokens (0: off)
  rope_clamp: int = 0  # sink and cache keys over N tokens back scored at N (0: off; rope_clamp.py)


def draw_projection_for(options: Options, key, head_dim, num_heads=None):
  """A random matrix [m, d] (or [num_heads, m, d]) drawn as ``options`` say."""
  return projection_lib.draw_projection(
    key,
    options.num_features,
    head_dim,
    orthogonal=options.orthogonal,
    feature_norms=options.feature_norms,
    num_heads=num_heads,
  )


def heads_major(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2)


def scaled(x: jax.Array) -> jax.Array:
  """x / d**0.25 in x's dtype: phi(q).phi(k) then estimates exp(q.k/sqrt(d))."""
  return (x * (x.shape[-1] ** -0.25)).astype(x.dtype)


def project(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [B, L, H, d] (already scaled) times w [m, d] or [H, m, d] ->
  [B, H, L, m] in float32.

  x is moved to heads-major before the matmul: the copy is m/d times smaller
  than the output, and a canonical batched matmul runs about 2.5x faster on
  CPU than one that writes a transposed result.
  """
  w = w.astype(x.dtype)
  spec = 'bhld,md->bhlm' if w.ndim == 2 else 'bhld,hmd->bhlm'
  return jnp.einsum(spec, heads_major(x), w, preferred_element_type=jnp.float32)


def half_sq_norm(x: jax.Array) -> jax.Array:
  """|x|^2 / 2 of already scaled x as [B, H, L] in float32."""
  xf = x.astype(jnp.float32)
  return heads_major(0.5 * jnp.sum(xf * xf, axis=-1))


def zero_log_scale(x: jax.Array) -> jax.Array:
  b, length, h, _ = x.shape
  return jnp.zeros((b, h, length), jnp.float32)


def exp_parts(logits: jax.Array):
  """(exp(logits - row max), row max): the split of a positive exponential."""
  row_max = sg(jnp.max(logits, axis=-1))
  return jnp.exp(logits - row_max[..., None]), row_max


def exp_shared(logits: jax.Array, mask) -> jax.Array:
  """exp(logits - one max over all keys and features of a (batch, head))."""
  if mask is not None:
    logits = jnp.where(mask[:, None, :, None], logits, NEG)
  shift = sg(jnp.max(logits, axis=(2, 3), keepdims=True))
  shift = jnp.where(shift > NEG / 2, shift, 0.0)  # every key masked: all zeros
  return jnp.exp(logits - shift)


class FeatureMap(nnx.Module):
  """Base class. Subclasses define ``query``, ``key``, ``exact_query``,
  ``exact_key`` and ``num_features``; the rest has generic defaults."""

  uses_projection = False  # owns a RandomProjection matrix

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

  @property
  def num_features(self) -> int:
    """M, the length of phi(x): sizes the recurrent state."""
    return self.head_dim

  def calibrate(self, q, k, *, causal, mask=None, segment_ids=None):
    """Data-dependent constants for ``query``/``key``; None by default."""
    del q, k, causal, mask, segment_ids
    return None

  def query_parts(self, x, ctx):
    """(q~, r_q) with phi(q) = q~ exp(r_q) at its true scale, constants included, so
    that phi(q).phi(k) = q~.k~ exp(r_q + r) with ``key``'s (k~, r). The windowed
    hybrid needs it to put linear and exact scores under one normaliser. Default: a
    map whose ``query`` already has its true scale and whose keys have no constant."""
    return self.query(x, ctx), zero_log_scale(x)

  def masked_key(self, x, mask, ctx):
    """key(x, ctx) with masked keys dropped: k~ = 0 and log-scale NEG."""
    kf, kr = self.key(x, ctx)
    if mask is None:
      return kf, kr
    return kf * mask[:, None, :, None], jnp.where(mask[:, None, :], kr, NEG)

  def shared_key(self, x, mask, ctx):
    """phi(k) up to one factor per (batch, head), masked keys zero."""
    kf, kr = self.masked_key(x, mask, ctx)
    shift = sg(jnp.max(kr, axis=2, keepdims=True))
    return kf * jnp.exp(kr - shift)[..., None]

  def exact_key(self, x, ctx):
    return self.exact_query(x, ctx)


class RandomFeatureMap(FeatureMap):
  """A map that owns one random matrix w [m, d] (or [H, m, d] per head)."""

  uses_projection = True
  features_per_row = 1  # entries of phi per random direction

  def __init__(self, head_dim, num_heads, options, *, rngs=None, projection=None):
    super().__init__(head_dim, num_heads, options)
    heads = num_heads if options.per_head_features else None
    if projection is None:
      if rngs is None:
        raise ValueError(
          f'{type(self).__name__} needs a random feature '
          'matrix: pass projection=attention.draw_projection(...)'
        )
      projection = draw_projection_for(options, rngs.params(), head_dim, heads)
    projection = jnp.asarray(projection)
    if (
      projection.ndim not in (2, 3)
      or projection.shape[-1] != head_dim
      or (projection.ndim == 3 and projection.shape[0] != num_heads)
    ):
      raise ValueError(
        f'projection must be [m, {head_dim}] or [{num_heads}, m, {head_dim}], '
        f'got {projection.shape}'
      )
    # Draw options travel as metadata so that redraw_projections can redraw from
    # the same distribution.
    self.projection = projection_lib.RandomProjection(
      projection, orthogonal=options.orthogonal, feature_norms=options.feature_norms
    )

  @property
  def num_features(self) -> int:
    return self.features_per_row * self.projection.shape[-2]

  @property
  def w(self) -> jax.Array:
    return self.projection[...]


class ExpFeatureMap(RandomFeatureMap):
  """Positive exponential maps phi(x) = exp(logits(x)) / sqrt(M).

  Subclasses give ``logits(x, ctx, key=...)``, the full exponent for queries
  or keys, and may override ``query_logits`` to drop the terms that are
  constant along a query's row: they cancel against its row maximum.
  """

  def query_logits(self, x, ctx):
    return self.logits(x, ctx, key=False)

  def query(self, x, ctx):
    return exp_parts(self.query_logits(x, ctx))[0]

  def key(self, x, ctx):
    return exp_parts(self.logits(x, ctx, key=True))

  def shared_key(self, x, mask, ctx):
    return exp_shared(self.logits(x, ctx, key=True), mask)

  def query_parts(self, x, ctx):
    # phi = exp(logits) / sqrt(M) for queries and keys; both 1/sqrt(M) go on the query.
    qf, row_max = exp_parts(self.logits(x, ctx, key=False))
    return qf, row_max - math.log(qf.shape[-1])

  def _exact(self, x, ctx, key):
    logits = self.logits(x, ctx, key=key)
    return jnp.exp(logits) / jnp.sqrt(float(logits.shape[-1]))

  def exact_query(self, x, ctx):
    return self._exact(x, ctx, False)

  def exact_key(self, x, ctx):
    return self._exact(x, ctx, True)
