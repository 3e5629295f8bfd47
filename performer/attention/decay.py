"""A decaying linear part (``attention.linear_half_life = N``): key j weighs
0.5^((i - j) / N) for query i, in the features' log scales.

A position-free feature map (``linear_nope``) gives a key 4,000 tokens back the same
weight as one 100 back, while softmax under RoPE lets distant logits fall. Past the
rows it was converted on, the linear part's mass then grows with the length faster than
the exact mass of the same keys (on SmolLM2, 2-20x at 4k against 1-4x at 2k), and it
dilutes the window, the sinks and the sparse cache under the one normaliser (news
perplexity at 4k-8k: 31.6 without a decay, 25.1 with a half-life of 512). A decay
bounds that mass at any length (about N / ln 2 keys' worth), as in RetNet or GLA with
a fixed gate.

The factor splits into the two sides' log scales, q_r + i log(g) and kr - j log(g)
(g = 0.5^(1/N)), so the chunked prefix sums, the decoding state (S, z, M) and the
sparse cache's self-recall error (which needs kf only) run as they are; i and j count
each row's valid tokens, so padding and decoding agree with the forward pass. Causal
only: a later key would grow instead of decay.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def log_rate(half_life: int) -> float:
  """log(g) per token, negative."""
  return math.log(0.5) / half_life


def row_index(valid, start=None):
  """[B, L] int32: each token's index among its row's valid tokens, from ``start`` [B]
  (tokens a decoding state has already seen; 0 when None)."""
  index = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
  return index if start is None else index + start[:, None]


def queries(q_r, index, rate):
  """Query log scales q_r [B, H, L] with the decay up to index [B, L]."""
  return q_r + index[:, None, :].astype(q_r.dtype) * rate


def keys(kr, index, rate):
  """Key log scales kr [B, H, N] with the decay from index ([B, N] or per head [B, H, N])."""
  index = index[:, None, :] if index.ndim == 2 else index
  return kr - index.astype(kr.dtype) * rate
