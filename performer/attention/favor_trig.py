"""Trigonometric random features: [sin(w.x), cos(w.x)] exp(|x|^2/2) / sqrt(m).

Random Fourier features for the softmax kernel. They can be negative, so the
normaliser can change sign and training is unstable (the Performer paper's
point); kept only for comparison.
"""

import jax.numpy as jnp

from performer.attention import feature_map as fm


class FavorTrig(fm.RandomFeatureMap):
  features_per_row = 2

  def _parts(self, x):
    proj = fm.project(fm.scaled(x), self.w)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)

  def query(self, x, ctx):
    return self._parts(x)

  def key(self, x, ctx):
    return self._parts(x), fm.sg(fm.half_sq_norm(fm.scaled(x)))

  def query_parts(self, x, ctx):
    m = self.w.shape[-2]
    return self._parts(x), fm.half_sq_norm(fm.scaled(x)) - jnp.log(float(m))

  def exact_query(self, x, ctx):
    m = self.w.shape[-2]
    return self._parts(x) * jnp.exp(fm.half_sq_norm(fm.scaled(x)))[..., None] / jnp.sqrt(float(m))
