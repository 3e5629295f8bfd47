"""The Linear Transformer baseline (Katharopoulos et al. 2020):
phi(x) = elu(x) + 1, no random features, M = head_dim."""

import jax
import jax.numpy as jnp

from performer.attention import feature_map as fm


class LinearElu(fm.FeatureMap):
  def query(self, x, ctx):
    return fm.heads_major(jax.nn.elu(x.astype(jnp.float32)) + 1.0)

  def key(self, x, ctx):
    return self.query(x, ctx), fm.zero_log_scale(x)

  def exact_query(self, x, ctx):
    return self.query(x, ctx)
