"""`attention.sparse_cache_dtype`: the sparse cache's pairs stored in bfloat16, twice the
pairs in the same memory. Only storage changes: a kept pair is its own key and value
rounded, the rest of the state keeps its dtype, forward == prefill == decode, and the
pass stays exactly causal."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_attention_causal import _features, _qkv, assert_future_leaves_past_unchanged
from test_decode import check_decode_matches_forward, make_config

from performer import attention, models

# the index field (a decay keeps it) says which position each cached pair came from
OPTIONS = dict(window=3, sinks=1, sparse_cache=4, chunk_size=4, linear_half_life=1000)


def _prefill(attend, w, q, k, v):
  fresh = attend.init_state(2, 2, 8, 8, projection=w)
  return fresh, jax.jit(lambda s, q, k, v: attend.prefill(s, q, k, v, projection=w))(fresh, q, k, v)


def test_bfloat16_storage_keeps_each_pair_rounded_and_the_rest_as_is():
  q, k, v = _qkv(jax.random.PRNGKey(0), length=26)
  w = _features()
  wide = attention.get_attention('favor_softmax', **OPTIONS)
  narrow = attention.get_attention('favor_softmax', sparse_cache_dtype='bfloat16', **OPTIONS)
  fresh32, (out32, _) = _prefill(wide, w, q, k, v)
  fresh16, (out16, state) = _prefill(narrow, w, q, k, v)
  assert fresh16['cache']['k'].dtype == fresh16['cache']['v'].dtype == jnp.bfloat16
  assert fresh16['ring']['k'].dtype == fresh16['linear']['S'].dtype == jnp.float32
  assert fresh16['cache']['index'].dtype == jnp.int32
  for name in ('k', 'v'):
    assert fresh16['cache'][name].nbytes * 2 == fresh32['cache'][name].nbytes
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
    lambda x: (x.shape, x.dtype), fresh16
  )
  # every valid slot holds the rounded key and value of the position it names
  cache = jax.tree.map(np.asarray, state['cache'])
  assert cache['valid'].sum() == cache['valid'].size  # 26 tokens fill 4 slots per head
  for b, j, h in zip(*np.nonzero(cache['valid'])):
    position = cache['index'][b, j, h]
    for name, x in (('k', k), ('v', v)):
      want = np.asarray(x[b, position, h].astype(jnp.bfloat16))
      np.testing.assert_array_equal(np.asarray(cache[name][b, j, h]), want)
  # rounding moves the outputs a little, and does move them
  np.testing.assert_allclose(out16, out32, atol=2e-2, rtol=2e-2)
  assert np.max(np.abs(np.asarray(out16) - np.asarray(out32))) > 0
  # the forward pass is the same schedule from an empty state
  full = jax.jit(lambda q, k, v: narrow(q, k, v, causal=True, projection=w))(q, k, v)
  np.testing.assert_allclose(full, out16, atol=1e-5, rtol=1e-5)
  assert_future_leaves_past_unchanged(
    jax.jit(lambda q, k, v: narrow(q, k, v, causal=True, projection=w)), q, k, v, (0, 5, 17, 25)
  )


@pytest.mark.parametrize('linear_nope', [False, True])
def test_model_decode_matches_forward_with_a_bfloat16_cache(linear_nope):
  cfg = make_config(positions='rotary' if linear_nope else 'learned')
  options = dict(kind='hedgehog', window=2, sinks=1, sparse_cache=2, chunk_size=1)
  options.update(sparse_cache_dtype='bfloat16', linear_nope=linear_nope)
  cfg.attention = ml_collections.ConfigDict(dict(cfg.attention.to_dict(), **options))
  model = models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  layer = model.init_cache(1, 16)['layers'][0]
  stored = ('k', 'v', 'k_linear') if linear_nope else ('k', 'v')
  assert {layer['cache'][name].dtype for name in stored} == {jnp.dtype(jnp.bfloat16)}
  check_decode_matches_forward(model, length=12, prompt_lengths=(3, 8))


def test_storage_dtype_refusals():
  with pytest.raises(ValueError, match='sparse_cache_dtype must be one of'):
    attention.get_attention('favor_softmax', window=2, sparse_cache=2, sparse_cache_dtype='int8')
  with pytest.raises(ValueError, match='needs attention.sparse_cache'):
    attention.get_attention('favor_softmax', window=2, sparse_cache_dtype='bfloat16')
