"""FAVOR++: optimal positive random features (Likhosherstov et al., "Chefs'
Random Tables", NeurIPS 2022).

phi(x) = D exp(A |w|^2 + B w.x - |x|^2/2) / sqrt(m), B = sqrt(1 - 4A),
D = (1 - 4A)^(d/4), is unbiased for exp(x.y) for every A < 1/8; A = 0 is
FAVOR+. The estimator's second moment for a pair is minimised by

  A* = -rho / (1 - 2 rho + sqrt((2 rho + 1)^2 + 8 rho)),  rho = |x + y|^2 / d

(the rationalised root of 16 A^2 - (2 - 4 rho) A - rho = 0, free of
cancellation). |x + y|^2 is replaced by its mean over query-key pairs,
rho = (E|x|^2 + E|y|^2 + 2 E[x].E[y]) / d, computed from per-dimension first
and second moments under stop_gradient: one A per (sequence, head).

Causality. Bidirectional attention takes the moments from the current
sequence (per packed segment, padding excluded). Causal attention must not:
moments over a whole sequence would let future tokens move A. It takes them
from a running average over earlier training batches (``FeatureStats``,
updated when ``use_running_average`` is False, i.e. inside train steps),
frozen in eval and decoding, so decoding equals the forward pass. Before any
statistics exist A = 0: an uncalibrated model is exactly FAVOR+.

Because A <= 0 the features are bounded; keys still go through the running
maximum of ``linear.py`` like every exponential map.
"""

import jax
import jax.numpy as jnp

from performer.attention import feature_map as fm

_TINY = 1e-12


def optimal_a(rho):
  """The variance-minimising A for the statistic rho >= 0 (A <= 0)."""
  rho = jnp.maximum(rho, 0.0)
  return -rho / (1.0 - 2.0 * rho + jnp.sqrt((2.0 * rho + 1.0) ** 2 + 8.0 * rho))


def context(a, head_dim, psi=None):
  """The constants of phi for a given A [..., H]: B = sqrt(1 - 4A) and
  log D = (d/4) log(1 - 4A); psi [..., H, d] is FAVOR#'s alignment (or None)."""
  return {
    'a': a,
    'b': jnp.sqrt(1.0 - 4.0 * a),
    'log_d': 0.25 * head_dim * jnp.log1p(-4.0 * a),
    'psi': psi,
  }


def _runs(segment_ids):
  """Index of each position's contiguous run of equal segment ids [B, L]."""
  starts = jnp.concatenate(
    [jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  return jnp.cumsum(starts, axis=1)


def token_moments(x, y, mask=None, segment_ids=None):
  """Per-dimension E[x], E[x^2], E[y], E[y^2] over each sequence (or packed
  segment) as [B, 1 or L, H, 4, d], padding excluded."""
  stacked = jnp.stack([x, x * x, y, y * y], axis=-2)  # [B, L, H, 4, d]
  weights = jnp.ones(x.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
  stacked = stacked * weights[:, :, None, None, None]
  if segment_ids is None:
    total = jnp.sum(stacked, axis=1, keepdims=True)
    count = jnp.sum(weights, axis=1, keepdims=True)
  else:
    runs, length = _runs(segment_ids), x.shape[1]
    per_row = lambda s, r: jax.ops.segment_sum(s, r, length)
    total = jnp.take_along_axis(
      jax.vmap(per_row)(stacked, runs), runs[:, :, None, None, None], axis=1
    )
    count = jnp.take_along_axis(jax.vmap(per_row)(weights, runs), runs, axis=1)
  return total / jnp.maximum(count, 1.0)[:, :, None, None, None]


def batch_moments(x, y, mask=None):
  """The same moments over every real token of the batch: ([H, 4, d], count)."""
  weights = jnp.ones(x.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
  stacked = jnp.stack([x, x * x, y, y * y], axis=-2)
  count = jnp.sum(weights)
  total = jnp.einsum('bl,blhkd->hkd', weights, stacked)
  return total / jnp.maximum(count, 1.0), count


class FavorPlusPlus(fm.ExpFeatureMap):
  aligned = False  # FAVOR# rescales dimensions before FAVOR++

  def __init__(self, head_dim, num_heads, options, *, rngs=None, projection=None):
    super().__init__(head_dim, num_heads, options, rngs=rngs, projection=projection)
    self.decay = float(options.stats_decay)
    self.use_running_average = True
    # Running E[x], E[x^2], E[y], E[y^2] per head and dimension (x = q/d^1/4),
    # as an exponential average; `weight` (1 - decay^steps) debiases it.
    self.moments = fm.FeatureStats(jnp.zeros((num_heads, 4, head_dim), jnp.float32))
    self.weight = fm.FeatureStats(jnp.zeros((), jnp.float32))

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``: False inside train steps (update statistics)."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def _context(self, moments):
    """(A, B, log D) [..., H] and the alignment psi [..., H, d] (or None)."""
    ex, ex2, ey, ey2 = (moments[..., i, :] for i in range(4))
    psi = None
    if self.aligned:
      psi = ((ey2 + _TINY) / (ex2 + _TINY)) ** 0.25
      ex2, ey2, ex, ey = ex2 * psi**2, ey2 / psi**2, ex * psi, ey / psi
    rho = jnp.sum(ex2 + ey2 + 2.0 * ex * ey, axis=-1) / self.head_dim
    return context(optimal_a(rho), self.head_dim, psi)

  def calibrate(self, q, k, *, causal, mask=None, segment_ids=None):
    x = fm.sg(fm.scaled(q).astype(jnp.float32))
    y = fm.sg(fm.scaled(k).astype(jnp.float32))
    if causal:  # stored statistics of earlier batches only
      weight = self.weight[...]
      stored = self.moments[...] / jnp.maximum(weight, _TINY)
      ctx = self._context(stored[None, None])
      ctx = jax.tree.map(
        lambda c, u: jnp.where(weight > 0, c, u),
        ctx,
        self._context(jnp.zeros_like(stored)[None, None]),
      )
    else:
      ctx = self._context(token_moments(x, y, mask, segment_ids))
    if not self.use_running_average:
      self._update(*batch_moments(x, y, mask))
    return jax.tree.map(fm.sg, ctx)

  def _update(self, moments, count):
    rate = jnp.where(count > 0, 1.0 - self.decay, 0.0)
    self.moments[...] = (1.0 - rate) * self.moments[...] + rate * moments
    self.weight[...] = (1.0 - rate) * self.weight[...] + rate

  def _aligned(self, x, ctx, key):
    xs = fm.scaled(x)
    if ctx['psi'] is None:
      return xs
    psi = ctx['psi']
    return (xs * (1.0 / psi if key else psi)).astype(x.dtype)

  def _sq_norms(self):
    w = self.w.astype(jnp.float32)
    return jnp.sum(w * w, axis=-1)  # [m] or [H, m]

  def query_logits(self, x, ctx):
    # -|x|^2/2 and log D are constant along the row: they cancel.
    b, a = (fm.heads_major(ctx[n])[..., None] for n in ('b', 'a'))
    return b * fm.project(self._aligned(x, ctx, False), self.w) + a * self._sq_norms()[..., None, :]

  def logits(self, x, ctx, *, key):
    xs = self._aligned(x, ctx, key)
    b, a, log_d = (fm.heads_major(ctx[n])[..., None] for n in ('b', 'a', 'log_d'))
    return (
      b * fm.project(xs, self.w)
      + a * self._sq_norms()[..., None, :]
      - fm.half_sq_norm(xs)[..., None]
      + log_d
    )
