"""Generalized attention with ReLU features ("Performer-ReLU"):
phi(x) = ReLU(w.x) + 1e-3. The +eps is part of the kernel (every key keeps a
little weight), not a stabiliser, so it is safe in the causal case."""

import jax

from performer.attention import feature_map as fm

RELU_EPS = 1e-3


class FavorRelu(fm.RandomFeatureMap):
  def query(self, x, ctx):
    return jax.nn.relu(fm.project(fm.scaled(x), self.w)) + RELU_EPS

  def key(self, x, ctx):
    return self.query(x, ctx), fm.zero_log_scale(x)

  def exact_query(self, x, ctx):
    return self.query(x, ctx)
