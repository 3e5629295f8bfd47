"""Hedgehog: a learnable feature map that mimics softmax (Zhang et al.,
"The Hedgehog & the Porcupine", ICLR 2024).

phi(x) = [softmax(x W + b), softmax(-x W - b)] over the feature axis, with
W [d, d'] and b [d'] trainable (``FeatureParam``), one per head and separate
for queries and keys, initialised to the identity and zero: 2 d' features,
no random matrix, nothing to redraw. Inputs are scaled by d^-1/4 like every
other map, so at initialisation the map's temperature matches the softmax
kernel's.

Each half is a softmax, exp(z - logsumexp z): bounded in (0, 1] with no
per-token scale, so keys need no log-scale (r = 0) and the causal core's
running maximum is trivially safe.
"""

import jax
import jax.numpy as jnp

from performer.attention import feature_map as fm


def _identity_init(num_heads, head_dim, width):
  return jnp.broadcast_to(jnp.eye(head_dim, width, dtype=jnp.float32), (num_heads, head_dim, width))


class Hedgehog(fm.FeatureMap):
  def __init__(self, head_dim, num_heads, options, *, rngs=None, projection=None):
    super().__init__(head_dim, num_heads, options)
    width = options.hedgehog_dim or head_dim
    self.width = width
    self.query_weight = fm.FeatureParam(_identity_init(num_heads, head_dim, width))
    self.query_bias = fm.FeatureParam(jnp.zeros((num_heads, width)))
    self.key_weight = fm.FeatureParam(_identity_init(num_heads, head_dim, width))
    self.key_bias = fm.FeatureParam(jnp.zeros((num_heads, width)))

  @property
  def num_features(self):
    return 2 * self.width

  @staticmethod
  def _phi(x, weight, bias):
    z = jnp.einsum(
      'blhd,hdf->bhlf', fm.scaled(x), weight.astype(x.dtype), preferred_element_type=jnp.float32
    )
    z = z + bias[None, :, None, :]
    return jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)], axis=-1)

  def query(self, x, ctx):
    return self._phi(x, self.query_weight[...], self.query_bias[...])

  def key(self, x, ctx):
    return (self._phi(x, self.key_weight[...], self.key_bias[...]), fm.zero_log_scale(x))

  def exact_query(self, x, ctx):
    return self.query(x, ctx)

  def exact_key(self, x, ctx):
    return self.key(x, ctx)[0]
