"""Attention library: exact softmax, feature-map modules (one file per map),
random features and the linear-attention core (bidirectional, chunked causal,
recurrent step).

    from performer import attention
    attn = attention.build("favor_plus_plus", head_dim=64, num_heads=8,
                           rngs=nnx.Rngs(0), num_features=256)
    out = attn(q, k, v, causal=True, mask=None, segment_ids=None)

    # or as a plain function with an explicit random matrix:
    attend = attention.get_attention("favor_softmax", num_features=256)
    w = attention.draw_projection(key, num_features=256, head_dim=64)
    out = attend(q, k, v, causal=True, mask=None, segment_ids=None, projection=w)
    phi_q, phi_k = attend.features(q, k, projection=w)   # true-scale features

Variables a kind may own, each its own type: ``RandomProjection`` (redrawn,
not trained), ``FeatureParam`` (trained, absent from pretrained checkpoints)
and ``FeatureStats`` (running statistics, updated in train steps).
"""

from performer.attention.feature_map import FeatureMap, FeatureParam, FeatureStats, Options
from performer.attention.layers import Attention
from performer.attention.projection import (
  FEATURE_NORMS,
  RandomProjection,
  draw_projection,
  redraw_projections,
)
from performer.attention.registry import (
  KINDS,
  OPTIONS,
  REGISTRY,
  build,
  get_attention,
  make_options,
)
from performer.attention.softmax import softmax_reference

__all__ = [
  'FEATURE_NORMS',
  'KINDS',
  'OPTIONS',
  'REGISTRY',
  'Attention',
  'FeatureMap',
  'FeatureParam',
  'FeatureStats',
  'Options',
  'RandomProjection',
  'build',
  'draw_projection',
  'get_attention',
  'make_options',
  'redraw_projections',
  'softmax_reference',
]
