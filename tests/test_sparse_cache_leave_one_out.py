"""`attention.sparse_cache_leave_one_out`: each candidate of the sparse cache is scored
against the linear state plus every other candidate, as if they were all folded, instead
of the state alone (LoLA). Copies of one pair, a repeated phrase, then recall each other,
and the cache keeps one of them and room for what nothing else recalls."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_attention_causal import _features, _qkv, assert_future_leaves_past_unchanged
from test_decode import check_decode_matches_forward, make_config

from performer import attention, models
from performer.attention import linear, sparse_cache


def test_the_error_is_the_error_with_every_other_candidate_folded():
  rng = np.random.default_rng(0)
  arrays = lambda *shape: jnp.asarray(rng.random(shape), jnp.float32)  # noqa: E731
  kf, kr, v = arrays(1, 2, 5, 4), arrays(1, 2, 5) - 0.5, arrays(1, 2, 5, 3) - 0.5
  state = linear.add_keys(
    linear.init_state(1, 2, 4, 3), arrays(1, 2, 3, 4), arrays(1, 2, 3), v[:, :, :3]
  )
  held = linear.add_keys(state, kf, kr, v)
  error = sparse_cache.self_recall_error(held, kf, v, kr)
  for i in range(5):
    others = [j for j in range(5) if j != i]
    folded = linear.add_keys(state, kf[:, :, others], kr[:, :, others], v[:, :, others])
    want = sparse_cache.self_recall_error(folded, kf[:, :, i : i + 1], v[:, :, i : i + 1])
    np.testing.assert_allclose(error[:, :, i], want[:, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('leave_one_out', [False, True])
def test_copies_of_one_pair_recall_each_other(leave_one_out):
  """Three copies of (e1, b) and one (e2, c), |b| > |c|, against a state that knows only
  e0 -> a, with room for two: the state alone recalls none of them, so LoLA keeps two
  copies of b; left out one at a time, each copy is recalled by the others and (e2, c)
  stays beside one copy."""
  e = jnp.eye(3)
  a, b, c = jnp.array([1.0, 2.0]), jnp.array([-3.0, 0.5]), jnp.array([0.5, 1.0])
  state = linear.add_keys(
    linear.init_state(1, 1, 3, 2), e[None, None, :1], jnp.zeros((1, 1, 1)), a[None, None, None]
  )
  cache = sparse_cache.init(1, 2, 1, 3, 2)
  k = jnp.stack([e[1], e[1], e[1], e[2]])[None, :, None]  # [B, N, K, d]: keys double as features
  v = jnp.stack([b, b, b, c])[None, :, None]
  candidates = {'k': k, 'v': v, 'valid': jnp.ones((1, 4, 1), bool)}
  kf, kr = jnp.swapaxes(k, 1, 2), jnp.zeros((1, 1, 4))
  new, folded = sparse_cache.update(cache, state, candidates, kf, kr, leave_one_out)
  kept = sorted(tuple(np.asarray(x)) for x in new['v'][0, :, 0])
  if leave_one_out:
    assert kept == sorted([tuple(np.asarray(b)), tuple(np.asarray(c))])
    np.testing.assert_allclose(folded['S'][0, 0, 1], 2.0 * b)  # two copies folded
  else:
    assert kept == [tuple(np.asarray(b))] * 2
    np.testing.assert_allclose(folded['S'][0, 0, 2], c)


def test_prefill_equals_forward_and_stays_causal():
  q, k, v = _qkv(jax.random.PRNGKey(0), length=26)
  w = _features()
  options = dict(window=3, sinks=1, sparse_cache=4, chunk_size=4, linear_half_life=1000)
  attend = attention.get_attention('favor_softmax', sparse_cache_leave_one_out=True, **options)
  state = attend.init_state(2, 2, 8, 8, projection=w)
  out, _ = jax.jit(lambda s, q, k, v: attend.prefill(s, q, k, v, projection=w))(state, q, k, v)
  forward = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, projection=w))
  np.testing.assert_allclose(forward(q, k, v), out, atol=1e-5, rtol=1e-5)
  lola = attention.get_attention('favor_softmax', **options)
  lola_out = jax.jit(lambda q, k, v: lola(q, k, v, causal=True, projection=w))(q, k, v)
  assert np.max(np.abs(np.asarray(lola_out) - np.asarray(out))) > 0  # another choice of pairs
  assert_future_leaves_past_unchanged(forward, q, k, v, (0, 5, 17, 25))


def test_model_decode_matches_forward():
  cfg = make_config(positions='rotary')
  options = dict(kind='hedgehog', window=2, sinks=1, sparse_cache=2, chunk_size=1)
  options.update(sparse_cache_leave_one_out=True, linear_nope=True, sparse_cache_dtype='bfloat16')
  cfg.attention = ml_collections.ConfigDict(dict(cfg.attention.to_dict(), **options))
  model = models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  check_decode_matches_forward(model, length=12, prompt_lengths=(3, 8))


def test_refusals():
  with pytest.raises(ValueError, match='sparse_cache_leave_one_out must be True or False'):
    attention.get_attention('favor_softmax', window=2, sparse_cache=2, sparse_cache_leave_one_out=1)
  with pytest.raises(ValueError, match='needs attention.sparse_cache'):
    attention.get_attention('favor_softmax', window=2, sparse_cache_leave_one_out=True)
