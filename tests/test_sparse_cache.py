"""The `sparse_cache` option: LoLA's self-recall cache beside the window, the sinks and the
linear state (attention/sparse_cache.py), against a float64 loop over its schedule; forward
== prefill == decode where the chunks coincide; exact causality; a fixed-size state."""

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


def lola_reference(kind, q, k, v, w, *, window, sinks, size, chunk, mask):
  """float64, one (row, head) at a time, from the true-scale features: in each chunk a
  query scores its window, the sinks and the cache at the chunk's start exactly (gains
  1) and every other earlier key with phi(q).phi(k); at the chunk's end the cache and
  the keys evicted in it are ranked by SRE against the state of the folded keys, the
  top `size` stay and the rest are folded."""
  pq, pk = (
    np.asarray(x, np.float64)
    for x in attention.get_attention(kind).features(q, k, causal=True, mask=mask, projection=w)
  )
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  exact = np.exp(np.einsum('blhd,bshd->bhls', qn, kn) / np.sqrt(q.shape[-1]))
  lin = np.einsum('blhm,bshm->bhls', pq, pk)
  b_size, length, heads, _ = q.shape
  out = np.zeros(vn.shape)
  for b in range(b_size):
    valid = np.asarray(mask[b])
    sink = valid & (np.cumsum(valid) <= sinks)
    regular = valid & ~sink
    for h in range(heads):
      cache, s_state, z_state = [], np.zeros((pk.shape[-1], vn.shape[-1])), np.zeros(pk.shape[-1])
      for c0 in range(0, length, chunk):
        c1 = min(c0 + chunk, length)
        for n in range(c0, c1):
          if not valid[n]:
            continue
          exact_keys = sink | (regular & (n - np.arange(length) < window))
          exact_keys[cache] = True
          weights = np.where(exact_keys, exact[b, h, n], np.where(regular, lin[b, h, n], 0.0))
          weights[n + 1 :] = 0.0
          out[b, n, h] = weights @ vn[b, :, h] / weights.sum()
        evicted = [p for p in range(max(c0 - window, 0), c1 - window) if regular[p]]

        def recall_error(p):
          den = pk[b, p, h] @ z_state
          guess = pk[b, p, h] @ s_state / den if den != 0 else 0.0
          return np.sum((guess - vn[b, p, h]) ** 2)

        ranked = sorted(cache + evicted, key=recall_error, reverse=True)
        cache = ranked[:size]
        for p in ranked[size:]:
          s_state = s_state + np.outer(pk[b, p, h], vn[b, p, h])
          z_state = z_state + pk[b, p, h]
  return out


def _jit_forward(attend, w, mask):
  return jax.jit(lambda q, k, v: attend(q, k, v, causal=True, mask=mask, projection=w))


@pytest.mark.parametrize(
  'kind, chunk, sinks',
  [
    ('favor_softmax', 4, 2),
    ('hedgehog', 1, 0),
    pytest.param('favor_relu', 3, 1, marks=pytest.mark.slow),
  ],
)
def test_forward_equals_the_lola_reference(kind, chunk, sinks):
  q, k, v = _qkv(jax.random.PRNGKey(0), length=23)
  w = _features()
  mask = jnp.ones((2, 23), bool).at[1, :2].set(False)  # row 1 left-padded
  attend = attention.get_attention(
    kind, window=3, sinks=sinks, sparse_cache=3, chunk_size=chunk, eps=0.0
  )
  out = _jit_forward(attend, w, mask)(q, k, v)
  ref = lola_reference(kind, q, k, v, w, window=3, sinks=sinks, size=3, chunk=chunk, mask=mask)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  # the cache matters: without it (the same hybrid) the outputs differ
  plain = attention.get_attention(kind, window=3, sinks=sinks, chunk_size=chunk, eps=0.0)
  assert np.max(np.abs(_jit_forward(plain, w, mask)(q, k, v) - out)) > 1e-3


def test_forward_prefill_multi_turn_and_decode_agree():
  """Chunks of 4: the forward pass, one prefill and turns of 8, 4 and 11 tokens (the
  same chunk boundaries) give the same outputs and state. Chunks of 1: a prefill of 9
  then one step per token equals the forward pass."""
  length = 23
  q, k, v = _qkv(jax.random.PRNGKey(1), length=length)
  w = _features()
  mask = jnp.ones((2, length), bool).at[0, :3].set(False)
  options = dict(window=3, sinks=2, sparse_cache=3)
  attend = attention.get_attention('favor_softmax', chunk_size=4, **options)
  prefill = jax.jit(lambda s, q, k, v, m: attend.prefill(s, q, k, v, mask=m, projection=w))
  full = _jit_forward(attend, w, mask)(q, k, v)
  fresh = attend.init_state(2, 2, 8, 8, projection=w)
  once, state_once = prefill(fresh, q, k, v, mask)
  np.testing.assert_allclose(once, full, atol=1e-5, rtol=1e-5)
  state, outs = fresh, []
  for lo, hi in ((0, 8), (8, 12), (12, length)):
    out, state = prefill(state, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mask[:, lo:hi])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(state_once)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  attend = attention.get_attention('favor_softmax', chunk_size=1, **options)
  full = _jit_forward(attend, w, mask)(q, k, v)
  state = attend.init_state(2, 2, 8, 8, projection=w)
  out, state = jax.jit(lambda s, q, k, v, m: attend.prefill(s, q, k, v, mask=m, projection=w))(
    state, q[:, :9], k[:, :9], v[:, :9], mask[:, :9]
  )
  np.testing.assert_allclose(out, full[:, :9], atol=1e-5, rtol=1e-5)
  step = jax.jit(lambda s, q, k, v: attend.step(s, q, k, v, projection=w))
  for t in range(9, length):
    out_t, state = step(state, q[:, t], k[:, t], v[:, t])
    np.testing.assert_allclose(out_t, full[:, t], atol=1e-5, rtol=1e-5)


def test_sparse_cache_is_exactly_causal_and_differentiable():
  q, k, v = _qkv(jax.random.PRNGKey(2), length=30)
  w = _features()
  attend = attention.get_attention('favor_softmax', window=3, sinks=2, sparse_cache=2, chunk_size=4)
  fn = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, projection=w))
  base = assert_future_leaves_past_unchanged(fn, q, k, v, (0, 3, 4, 9, 27))
  ct = jax.random.normal(jax.random.PRNGKey(4), base.shape)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2)))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_the_state_has_a_fixed_size():
  attend = attention.get_attention('hedgehog', window=4, sinks=2, sparse_cache=5, chunk_size=4)
  fresh = attend.init_state(2, 2, 8, 8)
  assert fresh['cache']['k'].shape == (2, 5, 2, 8) and fresh['cache']['valid'].shape == (2, 5, 2)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), fresh)
  q, k, v = _qkv(jax.random.PRNGKey(5), length=26)
  for length in (5, 26):
    _, state = jax.jit(attend.prefill)(fresh, q[:, :length], k[:, :length], v[:, :length])
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes


def test_update_keeps_what_the_state_recalls_worst():
  """A state holding key e0 -> value a recalls a candidate (e0, a) exactly and knows
  nothing of e1: with room for one pair, (e1, b) stays and (e0, a) is folded."""
  e = jnp.eye(3)
  a, b = jnp.array([1.0, 2.0]), jnp.array([-3.0, 0.5])
  state = linear.add_keys(
    linear.init_state(1, 1, 3, 2), e[None, None, :1], jnp.zeros((1, 1, 1)), a[None, None, None]
  )
  cache = sparse_cache.init(1, 1, 1, 3, 2)
  k = jnp.stack([e[0], e[1]])[None, :, None]  # [B, N, H, d]: the keys double as features
  v = jnp.stack([a, b])[None, :, None]
  kf, kr = jnp.swapaxes(k, 1, 2), jnp.zeros((1, 1, 2))
  error = sparse_cache.self_recall_error(state, kf, jnp.swapaxes(v, 1, 2))
  np.testing.assert_allclose(error[0, 0], [0.0, float(jnp.sum(b * b))], atol=1e-6)
  candidates = {'k': k, 'v': v, 'valid': jnp.ones((1, 2, 1), bool)}
  new, state = sparse_cache.update(cache, state, candidates, kf, kr)
  np.testing.assert_array_equal(new['k'][0, 0, 0], e[1])
  np.testing.assert_allclose(state['S'][0, 0], 2.0 * e[:, :1] * a[None])  # e0 -> a, twice


def test_update_ranks_a_group_by_its_summed_error():
  """Two query heads share one kv head (grouped-query attention), each with its own
  state: head 0 knows e0 -> a, head 1 knows e1 -> b. Alone, each would keep the pair the
  other knows; the group keeps the pair whose summed error is larger, (e1, b) as
  |b|^2 > |a|^2, and folds (e0, a) into both heads' states."""
  e = jnp.eye(3)
  a, b = jnp.array([1.0, 2.0]), jnp.array([-3.0, 0.5])
  state = linear.add_keys(
    linear.init_state(1, 2, 3, 2),
    jnp.stack([e[:1], e[1:2]])[None],
    jnp.zeros((1, 2, 1)),
    jnp.stack([a[None], b[None]])[None],
  )
  cache = sparse_cache.init(1, 1, 1, 3, 2)
  k = jnp.stack([e[0], e[1]])[None, :, None]  # [B, N, K=1, d]: the keys double as features
  v = jnp.stack([a, b])[None, :, None]
  kf = jnp.repeat(jnp.swapaxes(k, 1, 2), 2, axis=1)  # [B, H=2, N, M]
  error = sparse_cache.self_recall_error(state, kf, jnp.repeat(jnp.swapaxes(v, 1, 2), 2, axis=1))
  np.testing.assert_allclose(error[0], [[0.0, 9.25], [5.0, 0.0]], atol=1e-6)
  candidates = {'k': k, 'v': v, 'valid': jnp.ones((1, 2, 1), bool)}
  new, state = sparse_cache.update(cache, state, candidates, kf, jnp.zeros((1, 2, 2)))
  assert new['k'].shape == (1, 1, 1, 3)
  np.testing.assert_array_equal(new['k'][0, 0, 0], e[1])
  np.testing.assert_allclose(state['S'][0, 0], 2.0 * e[:, :1] * a[None])
  np.testing.assert_allclose(state['S'][0, 1], e[:, :1] * a[None] + e[:, 1:2] * b[None])


def test_grouped_query_hybrid_stores_kv_heads_and_decodes_as_forward():
  """A Llama-family hybrid with 4 query heads on 2 kv heads: the ring, the sinks and the
  cache hold the 2 kv heads, as a KV cache does (the linear state one per query head),
  and decoding still equals the forward pass."""
  cfg = ml_collections.ConfigDict(
    dict(
      family='llama', vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, emb_dim=32,
      mlp_dim=48, max_len=32, rope_theta=500.0,
      attention=dict(
        kind='hedgehog', window=2, sinks=1, sparse_cache=2, chunk_size=1, linear_nope=True
      ),
    )
  )  # fmt: skip
  model = models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  layer = model.init_cache(1, 16)['layers'][0]
  assert layer['ring']['k'].shape == layer['ring']['k_linear'].shape == (1, 2, 2, 8)
  assert layer['cache']['k'].shape == (1, 2, 2, 8) and layer['cache']['valid'].shape == (1, 2, 2)
  assert layer['sinks']['v'].shape == (1, 1, 2, 8) and layer['linear']['S'].shape[1] == 4
  check_decode_matches_forward(model, length=12, prompt_lengths=(3, 8))


def test_sparse_cache_options_and_refusals():
  q, k, v = _qkv(jax.random.PRNGKey(6), length=12)
  w = _features()
  with pytest.raises(ValueError, match='needs attention.window'):
    attention.get_attention('favor_softmax', sparse_cache=4)
  with pytest.raises(ValueError, match='sparse_cache must be an integer'):
    attention.get_attention('favor_softmax', window=2, sparse_cache=-1)
  attend = attention.get_attention('favor_softmax', window=2, sparse_cache=2, chunk_size=4)
  with pytest.raises(ValueError, match='causal'):
    attend(q, k, v, causal=False, projection=w)
  with pytest.raises(ValueError, match='segment_ids'):
    attend(q, k, v, causal=True, segment_ids=jnp.zeros((2, 12), jnp.int32), projection=w)
  with pytest.raises(ValueError, match='sparse cache'):
    attend.bind(8, 2, w).weights(q, k, causal=True)
  # window_off drops the window and the cache with it: linear attention over every key
  off = attention.get_attention(
    'favor_softmax', window=2, sparse_cache=2, window_off=True, chunk_size=4
  )
  plain = attention.get_attention('favor_softmax', chunk_size=4)
  np.testing.assert_allclose(
    off(q, k, v, causal=True, projection=w), plain(q, k, v, causal=True, projection=w)
  )


@pytest.mark.parametrize(
  'options, prompts',
  [
    (dict(window=2, sinks=1, sparse_cache=2, chunk_size=1), (6, 6)),
    (dict(sinks=2, chunk_size=4), (3, 8)),
    # right-padded prompts of mixed lengths: the ring keeps each row's own last W keys
    (dict(window=2, chunk_size=4), (3, 8)),
    (dict(window=4, sinks=1, chunk_size=4), (2, 9)),
    (dict(kind='favor_plus_plus', window=2, chunk_size=4), (3, 8)),  # a calibrated map
    (dict(window=2, sinks=1, sparse_cache=2, chunk_size=1), (3, 8)),
    # the feature map sees q, k before rotary positions; the ring and cache keep both
    (
      dict(kind='hedgehog', window=2, sinks=1, sparse_cache=2, chunk_size=1, linear_nope=True),
      (3, 8),
    ),
    (dict(kind='hedgehog', window=4, sinks=1, chunk_size=4, linear_nope=True), (2, 9)),
    # a decaying linear part: the state counts valid tokens, the ring and cache keep indices
    (dict(window=2, sinks=1, sparse_cache=2, chunk_size=1, linear_half_life=3), (3, 8)),
    (dict(window=4, sinks=1, chunk_size=4, linear_half_life=3), (2, 9)),
  ],
)
def test_model_decode_matches_forward(options, prompts):
  """A tiny causal LM through config.model.attention: its cache carries the ring, the
  sinks and the sparse cache; decoding equals the forward pass (a sparse cache with
  chunk_size 1, where the two schedules coincide)."""
  cfg = make_config(positions='rotary' if 'linear_nope' in options else 'learned')
  cfg.attention = ml_collections.ConfigDict(dict(cfg.attention.to_dict(), **options))
  model = models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  check_decode_matches_forward(model, length=12, prompt_lengths=prompts)
