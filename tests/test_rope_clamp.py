"""attention.rope_clamp: a sink or cached key N or more valid tokens before its query is
scored at distance N (attention/rope_clamp.py), from its unrotated copy and the query
rotated to N.

* the sinks (packed and one-segment paths) and the cache score exactly what rotary
  positions clamped at N give, against a float64 loop; a packed segment counts from
  its start;
* with N past the sequence nothing changes; a model decodes as its forward pass, and
  the hybrid stays exactly causal;
* the refusals: no linear_nope, no sinks or cache, N inside the window, no far_q.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_attention_causal import assert_future_leaves_past_unchanged
from test_decode import check_decode_matches_forward, make_config

from performer import attention, models
from performer.attention import rope_clamp, sinks, sparse_cache
from performer.models.positions import apply_rope

HEADS, DIM = 2, 8


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _rotated_score(q_u, k_u, query_pos, key_pos):
  """float64 q.k / sqrt(d) of q_u at query_pos and k_u at key_pos, per head [H]."""
  at = lambda x, p: np.asarray(apply_rope(x[None, None], jnp.full((1, 1), p)), np.float64)[0, 0]  # noqa: E731
  return np.einsum('hd,hd->h', at(q_u, query_pos), at(k_u, key_pos)) / np.sqrt(DIM)


def _clamped_key_pos(query_pos, key_pos, clamp):
  return key_pos if query_pos - key_pos < clamp else query_pos - clamp


@pytest.mark.parametrize('packed', [True, False])
def test_sinks_score_far_keys_at_the_clamp(packed):
  size, clamp = 2, 4
  lengths = (6, 9) if packed else (15,)
  seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])[None]
  pos = np.concatenate([np.arange(n) for n in lengths])[None]  # positions restart per segment
  length = seg.shape[1]
  q_u, k_u = _normal(0, (1, length, HEADS, DIM)), _normal(1, (1, length, HEADS, DIM))
  v = _normal(2, (1, HEADS, length, DIM))
  q, k = apply_rope(q_u, jnp.asarray(pos)), apply_rope(k_u, jnp.asarray(pos))
  far_q = apply_rope(q_u, jnp.full(pos.shape, clamp))
  valid = jnp.ones((1, length), bool)
  index = rope_clamp.query_index(valid, jnp.asarray(seg) if packed else None)
  np.testing.assert_array_equal(index, pos)
  is_sink = sinks.flags(valid, jnp.asarray(seg), size)
  far = rope_clamp.far_inputs(far_q, k_u, index)
  num, den, _, _ = sinks.attend(
    q,
    k,
    v,
    jnp.asarray(seg),
    is_sink,
    None,
    far,
    size=size,
    causal=True,
    packed=packed,
    rope_clamp=clamp,
  )
  out = np.asarray(num / den[..., None])[0]  # [H, L, D]
  for n in range(length):
    keys = [p for p in range(n + 1) if seg[0, p] == seg[0, n] and is_sink[0, p]]
    logits = np.stack(
      [
        _rotated_score(
          q_u[0, n], k_u[0, p], pos[0, n], _clamped_key_pos(pos[0, n], pos[0, p], clamp)
        )
        for p in keys
      ]
    )  # [keys, H]
    weights = np.exp(logits - logits.max(0))
    expected = np.einsum('kh,hkd->hd', weights / weights.sum(0), np.asarray(v[0][:, keys]))
    np.testing.assert_allclose(out[:, n], expected, rtol=1e-4, atol=1e-5)


def test_cache_scores_far_keys_at_the_clamp():
  clamp, key_pos, query_pos = 6, np.array([0, 4, 9]), np.array([10, 12, 15])
  k_u = _normal(0, (1, 3, HEADS, DIM))
  v = _normal(1, (1, 3, HEADS, DIM))
  q_u = _normal(2, (1, 3, HEADS, DIM))
  cache = {
    'k': apply_rope(k_u, jnp.asarray(key_pos)[None]),
    'k_linear': k_u,
    'v': v,
    'valid': jnp.ones((1, 3, HEADS), bool),
    'index': jnp.broadcast_to(jnp.asarray(key_pos)[None, :, None], (1, 3, HEADS)),
  }
  q = apply_rope(q_u, jnp.asarray(query_pos)[None])
  far = {'q': apply_rope(q_u, jnp.full((1, 3), clamp)), 'index': jnp.asarray(query_pos)[None]}
  num, den, _ = sparse_cache.read(cache, q, far, clamp)
  out = np.asarray(num / den[..., None])[0]
  for n, i in enumerate(query_pos):
    logits = np.stack(
      [
        _rotated_score(q_u[0, n], k_u[0, j], i, _clamped_key_pos(i, p, clamp))
        for j, p in enumerate(key_pos)
      ]
    )
    weights = np.exp(logits - logits.max(0))
    expected = np.einsum('kh,khd->hd', weights / weights.sum(0), np.asarray(v[0]))
    np.testing.assert_allclose(out[:, n], expected, rtol=1e-4, atol=1e-5)


def _model(**options):
  cfg = make_config(kind='hedgehog', positions='rotary')
  base = dict(window=2, sinks=1, sparse_cache=2, chunk_size=1, linear_nope=True)
  cfg.attention = ml_collections.ConfigDict({**cfg.attention.to_dict(), **base, **options})
  return models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))


def test_a_clamp_past_the_sequence_changes_nothing_and_a_near_one_does():
  model = _model()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.vocab_size, (2, 14)))
  plain = np.asarray(model(tokens)[0])
  np.testing.assert_allclose(
    np.asarray(_model(rope_clamp=14)(tokens)[0]), plain, rtol=1e-6, atol=1e-6
  )
  near = np.asarray(_model(rope_clamp=4)(tokens)[0])
  np.testing.assert_allclose(near[:, :4], plain[:, :4], rtol=1e-6, atol=1e-6)
  assert np.abs(near[:, 5:] - plain[:, 5:]).max() > 1e-3


@pytest.mark.parametrize(
  'options',
  [dict(rope_clamp=4), dict(rope_clamp=3, sparse_cache=0, chunk_size=4, linear_half_life=3)],
)
def test_model_decode_matches_forward(options):
  check_decode_matches_forward(_model(**options), length=12, prompt_lengths=(3, 8))


def test_clamped_hybrid_is_exactly_causal():
  q, k, v = (_normal(i, (1, 24, HEADS, DIM)) for i in range(3))
  attend = attention.get_attention(
    'hedgehog', window=2, sinks=2, sparse_cache=2, chunk_size=4, linear_nope=True, rope_clamp=5
  )
  module = attend.bind(DIM, HEADS, rngs=nnx.Rngs(0))
  fn = jax.jit(lambda q, k, v: module(q, k, v, causal=True, linear_qk=(q * 0.5, k * 0.5), far_q=-q))
  assert_future_leaves_past_unchanged(fn, q, k, v, (0, 3, 8, 21))


def test_refusals():
  with pytest.raises(ValueError, match='linear_nope=True'):
    attention.get_attention('hedgehog', window=2, sinks=1, rope_clamp=8)
  with pytest.raises(ValueError, match='needs one of them'):
    attention.get_attention('hedgehog', window=2, linear_nope=True, rope_clamp=8)
  with pytest.raises(ValueError, match='must exceed the window'):
    attention.get_attention('hedgehog', window=8, sinks=1, linear_nope=True, rope_clamp=8)
  with pytest.raises(ValueError, match='rope_clamp must be an integer'):
    attention.get_attention('hedgehog', window=2, sinks=1, linear_nope=True, rope_clamp=-1)
  attend = attention.get_attention('hedgehog', window=2, sinks=1, linear_nope=True, rope_clamp=4)
  module = attend.bind(DIM, HEADS, rngs=nnx.Rngs(0))
  q = _normal(0, (1, 6, HEADS, DIM))
  with pytest.raises(ValueError, match='far_q'):
    module(q, q, q, causal=True, linear_qk=(q, q))
  with pytest.raises(ValueError, match='acts past it'):
    module.weights(q, q, causal=True, linear_qk=(q, q))
  # within the clamp, the matrix is the unclamped hybrid's (the attention-transfer loss)
  plain = attention.get_attention('hedgehog', window=2, sinks=1, linear_nope=True)
  plain = plain.bind(DIM, HEADS, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(
    module.weights(q[:, :4], q[:, :4], causal=True, linear_qk=(q[:, :4], q[:, :4])),
    plain.weights(q[:, :4], q[:, :4], causal=True, linear_qk=(q[:, :4], q[:, :4])),
  )
