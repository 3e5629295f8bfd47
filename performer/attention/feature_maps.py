"""Feature maps phi for linear attention, split into numerically safe parts.

Every map returns three things from which the kernel phi(q).phi(k) is
rebuilt exactly:

* ``query(x, w)`` -> q~ [..., M]: phi(q) up to a per-token positive factor.
  A per-token factor is harmless for queries because it cancels between the
  numerator and the normaliser of that query's own row.
* ``key(x, w)`` -> (k~ [..., M], r [...]): phi(k) = k~ * exp(r) * const, with
  k~ bounded. The log-scale r is NOT divided out per token (that would reweight
  keys and bias attention); the linear-attention core handles it with a
  running maximum that never looks ahead (see ``linear.py``).
* ``shared_key(x, w, mask)`` -> phi(k) times one positive constant per
  (batch, head), zero on masked keys: what bidirectional attention needs, where
  one shared factor cancels. Exponential maps compute it in one pass.
* ``exact(x, w)`` -> phi(x) with its true scale, for tests and notebooks.

Queries and keys are scaled by d**-0.25 so that phi(q).phi(k) estimates
exp(q.k / sqrt(d)).

Inputs are [B, L, H, d]; outputs are heads-major, [B, H, L, M] (log-scales
[B, H, L]): the projection writes that layout for free, and every later
contraction is then a plain batched matmul over (B, H) with no transposes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from performer.attention.linear import NEG

_sg = jax.lax.stop_gradient


def _heads_major(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2)


def _project(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [B, L, H, d] times w [m, d] or [H, m, d] -> [B, H, L, m] in float32.

  x is moved to heads-major before the matmul: the copy is m/d times smaller
  than the output, and a canonical batched matmul runs about 2.5x faster on
  CPU than one that writes a transposed result.
  """
  xs = _heads_major((x * (x.shape[-1] ** -0.25)).astype(x.dtype))
  w = w.astype(x.dtype)
  spec = "bhld,md->bhlm" if w.ndim == 2 else "bhld,hmd->bhlm"
  return jnp.einsum(spec, xs, w, preferred_element_type=jnp.float32)


def _half_sq_norm(x: jax.Array) -> jax.Array:
  """|x / d**0.25|^2 / 2 as [B, H, L]."""
  xs = x.astype(jnp.float32) * (x.shape[-1] ** -0.25)
  return _heads_major(0.5 * jnp.sum(xs * xs, axis=-1))


def _exp_logits_to_parts(logits):
  """Shared by the positive-exponential maps: per-row max as the log-scale."""
  row_max = _sg(jnp.max(logits, axis=-1))
  return jnp.exp(logits - row_max[..., None]), row_max


def _exp_query(x, w, projection_logits):
  """exp(logits - row max). The -|x|^2/2 term is constant along the row, so
  it cancels with the row max and is never computed."""
  return _exp_logits_to_parts(projection_logits(_project(x, w)))[0]


def _exp_shared_key(x, w, mask, logits_fn):
  """exp(logits - one max over all keys and features of a (batch, head))."""
  logits = logits_fn(x, w)
  if mask is not None:
    logits = jnp.where(mask[:, None, :, None], logits, NEG)
  shift = _sg(jnp.max(logits, axis=(2, 3), keepdims=True))
  shift = jnp.where(shift > NEG / 2, shift, 0.0)  # every key masked: all zeros
  return jnp.exp(logits - shift)


def _generic_shared_key(feature_map, x, w, mask):
  """k~ exp(r - max r): any map's key parts with one shift per (batch, head)."""
  kf, kr = feature_map.masked_key(x, w, mask)
  shift = _sg(jnp.max(kr, axis=2, keepdims=True))
  return kf * jnp.exp(kr - shift)[..., None]


# --- favor_softmax: exp(w.x - |x|^2/2) / sqrt(m) ---------------------------

def _softmax_logits(x, w):
  return _project(x, w) - _half_sq_norm(x)[..., None]


def _identity(projection):
  return projection


def _plus_minus(projection):
  return jnp.concatenate([projection, -projection], axis=-1)


def _softmax_exact(x, w):
  logits = _softmax_logits(x, w)
  return jnp.exp(logits) / jnp.sqrt(float(logits.shape[-1]))


# --- favor_hyperbolic: [exp(w.x), exp(-w.x)] * exp(-|x|^2/2) / sqrt(2m) ------

def _hyperbolic_logits(x, w):
  return _plus_minus(_project(x, w)) - _half_sq_norm(x)[..., None]


def _hyperbolic_exact(x, w):
  logits = _hyperbolic_logits(x, w)
  return jnp.exp(logits) / jnp.sqrt(float(logits.shape[-1]))


# --- favor_trig: [sin(w.x), cos(w.x)] * exp(|x|^2/2) / sqrt(m) ---------------

def _trig_parts(x, w):
  proj = _project(x, w)
  return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def _trig_exact(x, w):
  m = w.shape[-2]
  return (_trig_parts(x, w) * jnp.exp(_half_sq_norm(x))[..., None]
          / jnp.sqrt(float(m)))


# --- favor_relu (generalized attention) and linear_elu -----------------------

RELU_EPS = 1e-3


def _relu_exact(x, w):
  return jax.nn.relu(_project(x, w)) + RELU_EPS


def _elu_exact(x, w):
  del w
  return _heads_major(jax.nn.elu(x.astype(jnp.float32)) + 1.0)


def _zero_log_scale(x):
  b, length, h, _ = x.shape
  return jnp.zeros((b, h, length), jnp.float32)


@dataclasses.dataclass(frozen=True)
class FeatureMap:
  """The three views of one feature map; see the module docstring."""
  name: str
  exact: Callable
  query: Callable
  key: Callable
  uses_features: bool = True
  positive: bool = True
  features_per_row: int = 1  # feature-vector entries per random direction
  fast_shared_key: Callable | None = None

  def masked_key(self, x, w, mask=None):
    """key(x, w) with masked keys dropped: k~ = 0 and log-scale NEG."""
    kf, kr = self.key(x, w)
    if mask is None:
      return kf, kr
    return kf * mask[:, None, :, None], jnp.where(mask[:, None, :], kr, NEG)

  def shared_key(self, x, w, mask=None):
    """phi(k) up to one factor per (batch, head), masked keys zero."""
    if self.fast_shared_key is not None:
      return self.fast_shared_key(x, w, mask)
    return _generic_shared_key(self, x, w, mask)

  def state_size(self, num_random: int, head_dim: int) -> int:
    """M, the length of phi(x): sizes the recurrent state."""
    if not self.uses_features:
      return head_dim
    return self.features_per_row * num_random


def _exp_map(name, logits_fn, projection_logits, exact_fn, **kwargs):
  return FeatureMap(
      name=name, exact=exact_fn,
      query=lambda x, w: _exp_query(x, w, projection_logits),
      key=lambda x, w: _exp_logits_to_parts(logits_fn(x, w)),
      fast_shared_key=lambda x, w, mask: _exp_shared_key(x, w, mask,
                                                         logits_fn),
      **kwargs)


FEATURE_MAPS = {
    "favor_softmax": _exp_map("favor_softmax", _softmax_logits, _identity,
                              _softmax_exact),
    "favor_hyperbolic": _exp_map("favor_hyperbolic", _hyperbolic_logits,
                                 _plus_minus, _hyperbolic_exact,
                                 features_per_row=2),
    "favor_trig": FeatureMap(
        name="favor_trig", exact=_trig_exact, query=_trig_parts,
        key=lambda x, w: (_trig_parts(x, w), _sg(_half_sq_norm(x))),
        positive=False, features_per_row=2),
    "favor_relu": FeatureMap(
        name="favor_relu", exact=_relu_exact, query=_relu_exact,
        key=lambda x, w: (_relu_exact(x, w), _zero_log_scale(x))),
    "linear_elu": FeatureMap(
        name="linear_elu", exact=_elu_exact, query=_elu_exact,
        key=lambda x, w: (_elu_exact(x, w), _zero_log_scale(x)),
        uses_features=False),
}
