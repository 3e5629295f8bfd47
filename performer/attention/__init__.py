"""Attention library: exact softmax, FAVOR+ feature maps, random features and
the linear-attention core (bidirectional, chunked causal, recurrent step).

    from performer import attention
    attend = attention.get_attention("favor_softmax", num_features=256)
    w = attention.draw_features(key, num_features=256, head_dim=64)
    out = attend(q, k, v, causal=True, mask=None, segment_ids=None, features=w)
"""

from performer.attention.feature_maps import FEATURE_MAPS
from performer.attention.features import RandomFeatures
from performer.attention.features import draw_features
from performer.attention.features import redraw_features
from performer.attention.kinds import KINDS
from performer.attention.kinds import OPTIONS
from performer.attention.kinds import Attention
from performer.attention.kinds import get_attention
from performer.attention.softmax import softmax_reference


def kernel_features(kind, x, features=None):
  """phi(x) with its true scale: phi(q).phi(k) estimates the kernel of
  ``kind`` (exp(q.k / sqrt(d)) for the softmax kinds). For analysis only: the
  attention functions use a numerically stabilised split of the same map."""
  if kind not in FEATURE_MAPS:
    raise ValueError(f"{kind!r} has no feature map; kinds with one: "
                     f"{', '.join(FEATURE_MAPS)}")
  # [B, H, L, M] internally; [B, L, H, M] like the inputs for callers.
  return FEATURE_MAPS[kind].exact(x, features).swapaxes(1, 2)


__all__ = ["KINDS", "OPTIONS", "Attention", "RandomFeatures", "draw_features",
           "get_attention", "kernel_features", "redraw_features",
           "softmax_reference"]
