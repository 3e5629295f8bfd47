"""attention.linear_half_life: a hybrid's linear part weighs key j 0.5^((i - j) / N)
for query i (attention/decay.py), the exact parts undecayed.

* the attention matrix is exactly that, against the same hybrid without decay, and
  indices count valid tokens (a left-padded row equals its unpadded self);
* the output is that matrix times v, the part stays exactly causal, and decoding equals
  the forward pass (the model cases in tests/test_sparse_cache.py; eight devices in
  tests/test_context_parallel.py);
* its mass stays bounded at any length where the undecayed part's grows;
* bidirectional attention and a decay without exact parts are refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_causal import assert_future_leaves_past_unchanged

from performer import attention

HALF_LIFE = 4


def _qkv(seed, length=12, heads=2, dim=8):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(kk, (1, length, heads, dim)) for kk in keys)


def _bound(**options):
  attend = attention.get_attention('favor_softmax', num_features=32, chunk_size=4, **options)
  return attend, attend.make_projection(jax.random.PRNGKey(1), 8)


def test_weights_decay_beyond_the_window_only():
  q, k, v = _qkv(0)
  window, length = 3, q.shape[1]
  plain, w = _bound(window=window, sinks=1)
  decayed, _ = _bound(window=window, sinks=1, linear_half_life=HALF_LIFE)

  def matrix(attend):
    return jax.jit(lambda q, k: attend.bind(8, 2, w).weights(q, k, causal=True))(q, k)[0]

  a, b = matrix(plain), matrix(decayed)  # [H, L, L]
  i = length - 1
  ratio = b[:, i] / a[:, i]  # each query's weights rescale by one normaliser
  beyond = np.arange(1, i - window + 1)  # past the sink (key 0), out of the window
  expected = 0.5 ** ((i - beyond) / HALF_LIFE)
  np.testing.assert_allclose(
    ratio[:, beyond] / ratio[:, i : i + 1], np.tile(expected, (2, 1)), rtol=1e-4
  )
  np.testing.assert_allclose(ratio[:, :1] / ratio[:, i : i + 1], 1.0, rtol=1e-5)  # sink
  np.testing.assert_allclose(ratio[:, i - window + 1 :] / ratio[:, i : i + 1], 1.0, rtol=1e-5)
  out = jax.jit(lambda q, k, v: decayed(q, k, v, causal=True, projection=w))(q, k, v)
  np.testing.assert_allclose(out, jnp.einsum('hqk,khd->qhd', b, v[0])[None], rtol=1e-4, atol=1e-5)


def test_indices_count_valid_tokens():
  """A row left-padded by 3 attends as the same row unpadded: padding takes no index."""
  q, k, v = _qkv(1, length=10)
  attend, w = _bound(window=2, sinks=1, linear_half_life=HALF_LIFE)
  pad = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :3]), x], axis=1)  # noqa: E731
  mask = jnp.ones((1, 13), bool).at[:, :3].set(False)
  run = jax.jit(lambda q, k, v, mask: attend(q, k, v, causal=True, mask=mask, projection=w))
  padded = run(pad(q), pad(k), pad(v), mask)
  np.testing.assert_allclose(padded[:, 3:], run(q, k, v, jnp.ones((1, 10), bool)), atol=1e-5)


@pytest.mark.parametrize('cache', [0, 2])
def test_decayed_hybrid_is_exactly_causal(cache):
  q, k, v = _qkv(2, length=30)
  attend, w = _bound(window=3, sinks=2, sparse_cache=cache, linear_half_life=HALF_LIFE)
  fn = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, projection=w))
  assert_future_leaves_past_unchanged(fn, q, k, v, (0, 3, 4, 9, 27))


def test_linear_mass_stays_bounded():
  """With every key alike, the last query's linear mass (against its window key's) grows
  with the number of keys without decay and levels off with it, at sum_d 0.5^(d / N)
  keys' worth."""
  q1, k1, _ = _qkv(3, length=1, heads=1)

  def far_share(length, **options):
    q, k = (jnp.broadcast_to(x, (1, length, 1, 8)) for x in (q1, k1))
    attend, w = _bound(window=1, **options)
    weights = jax.jit(lambda q, k: attend.bind(8, 1, w).weights(q, k, causal=True))(q, k)
    weights = weights[0, 0, -1]
    return float(jnp.sum(weights[:-1]) / weights[-1])

  plain = {n: far_share(n) for n in (256, 512)}
  decayed = {n: far_share(n, linear_half_life=HALF_LIFE) for n in (256, 512)}
  np.testing.assert_allclose(plain[512] / plain[256], 511 / 255, rtol=1e-4)
  np.testing.assert_allclose(decayed[512] / decayed[256], 1.0, rtol=1e-4)
  kept = np.sum(0.5 ** (np.arange(1, 512) / HALF_LIFE))  # 5.3 keys' worth, not 511
  np.testing.assert_allclose(decayed[512] / plain[512], kept / 511, rtol=1e-4)


def test_refusals():
  q, k, v = _qkv(4)
  attend, w = _bound(window=2, linear_half_life=HALF_LIFE)
  with pytest.raises(ValueError, match='causal attention only'):
    attend(q, k, v, causal=False, projection=w)
  with pytest.raises(ValueError, match='needs attention.window or attention.sinks'):
    attention.get_attention('favor_softmax', linear_half_life=8)
  with pytest.raises(ValueError, match='linear_half_life must be an integer'):
    attention.get_attention('favor_softmax', window=2, linear_half_life=-1)
