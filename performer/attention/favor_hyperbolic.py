"""FAVOR+ hyperbolic variant: [exp(w.x), exp(-w.x)] exp(-|x|^2/2) / sqrt(2m).

Antithetic pairs of directions: the same unbiased softmax-kernel estimate as
FAVOR+ with lower variance, at twice the feature count.
"""

import jax.numpy as jnp

from performer.attention import feature_map as fm


def _plus_minus(projection):
  return jnp.concatenate([projection, -projection], axis=-1)


class FavorHyperbolic(fm.ExpFeatureMap):
  features_per_row = 2

  def logits(self, x, ctx, *, key):
    del ctx, key
    xs = fm.scaled(x)
    return _plus_minus(fm.project(xs, self.w)) - fm.half_sq_norm(xs)[..., None]

  def query_logits(self, x, ctx):
    return _plus_minus(fm.project(fm.scaled(x), self.w))
