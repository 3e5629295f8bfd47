"""The `window` option: exact softmax over the last W keys (±W bidirectional) plus
linear attention beyond, under one normaliser (attention/window.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_causal import (
  _features,
  _qkv,
  assert_future_leaves_past_unchanged,
  normalised_reference,
)

from performer import attention

# The learned map and FAVOR+ by default; the others under -m slow (same code path).
SLOW_KINDS = [
  pytest.param(k, marks=pytest.mark.slow) for k in ('favor_relu', 'linear_elu', 'favor_sharp')
]
KINDS = ['favor_softmax', 'hedgehog'] + SLOW_KINDS
# (kind, causal): each mode once by default, every pair under -m slow
MODES = (
  [('favor_softmax', True), ('hedgehog', False)]
  + [
    pytest.param(kind, causal, marks=pytest.mark.slow)
    for kind, causal in (('favor_softmax', False), ('hedgehog', True))
  ]
  + [
    pytest.param(k.values[0], c, marks=pytest.mark.slow) for k in SLOW_KINDS for c in (True, False)
  ]
)
# The dense-reference comparison: causal by default (the bidirectional band runs in the
# exact-softmax test and the 8-device tests), every pair under -m slow.
DENSE_MODES = [MODES[0], pytest.param(*MODES[1], marks=pytest.mark.slow)] + MODES[2:]


def dense_reference(kind, q, k, v, w, *, window, causal, mask=None, segment_ids=None, gain=1.0):
  """float64 weights from the unstabilised exact features: g exp(q.k/sqrt(d)) inside
  the window, phi(q).phi(k) outside, normalised once."""
  pq, pk = (
    np.asarray(x, np.float64)
    for x in attention.get_attention(kind).features(
      q, k, causal=causal, mask=mask, segment_ids=segment_ids, projection=w
    )
  )
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  exact = gain * np.exp(np.einsum('blhd,bshd->bhls', qn, kn) / np.sqrt(q.shape[-1]))
  linear = np.einsum('blhm,bshm->bhls', pq, pk)
  length = q.shape[1]
  gap = np.arange(length)[:, None] - np.arange(length)[None, :]
  in_band = ((gap >= 0) & (gap < window)) if causal else (np.abs(gap) < window)
  return normalised_reference(np.where(in_band, exact, linear), v, causal, mask, segment_ids)


@pytest.mark.parametrize('kind, causal', DENSE_MODES)
def test_window_equals_dense_hybrid_with_mask_and_segments(kind, causal):
  q, k, v = _qkv(jax.random.PRNGKey(0), length=29)
  w = _features()
  seg = jnp.array([[1] * 12 + [2] * 13 + [0] * 4, [3] * 29])
  mask = seg > 0
  for window, chunk in ((4, 8), (5, 3), (13, 16)):
    attend = attention.get_attention(kind, window=window, chunk_size=chunk, eps=0.0)
    out = attend(q, k, v, causal=causal, mask=mask, segment_ids=seg, projection=w)
    ref = dense_reference(
      kind, q, k, v, w, window=window, causal=causal, mask=mask, segment_ids=seg
    )
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('kind, causal', MODES)
def test_window_covering_the_sequence_is_exact_softmax(kind, causal):
  q, k, v = _qkv(jax.random.PRNGKey(1), length=21)
  seg = jnp.array([[1] * 9 + [2] * 12, [1] * 17 + [0] * 4])
  mask = seg > 0
  exact = attention.get_attention('softmax', implementation='reference')
  want = exact(q, k, v, causal=causal, mask=mask, segment_ids=seg)
  for window in (21, 64):
    attend = attention.get_attention(kind, window=window, chunk_size=8)
    got = attend(q, k, v, causal=causal, mask=mask, segment_ids=seg, projection=_features())
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_window_is_exactly_causal(kind):
  q, k, v = _qkv(jax.random.PRNGKey(2), length=40)
  w = _features()
  attend = attention.get_attention(kind, window=6, chunk_size=8)
  fn = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, projection=w))
  assert_future_leaves_past_unchanged(fn, q, k, v, (0, 5, 6, 21, 38))


@pytest.mark.parametrize(
  'kind', ['hedgehog', pytest.param('favor_softmax', marks=pytest.mark.slow)] + SLOW_KINDS
)
def test_window_decode_equals_forward(kind):
  """Prefill (with a padded prompt row) then one step per token, the ring buffer
  evicting into the linear state, equals the full causal pass at every position."""
  length, prompt, window = 23, 9, 4
  q, k, v = _qkv(jax.random.PRNGKey(4), length=length)
  w = _features()
  attend = attention.get_attention(kind, window=window, chunk_size=4)
  mask = jnp.ones((2, length), bool).at[1, :3].set(False)  # row 1: 3 left-padded tokens
  full = attend(q, k, v, causal=True, mask=mask, projection=w)
  state = attend.init_state(2, 2, 8, 8, projection=w, max_length=length)
  out, state = attend.prefill(
    state, q[:, :prompt], k[:, :prompt], v[:, :prompt], mask=mask[:, :prompt], projection=w
  )
  np.testing.assert_allclose(out, full[:, :prompt], atol=1e-5, rtol=1e-5)
  assert state['ring']['k'].shape == (2, window, 2, 8)  # constant in the context length
  step = jax.jit(lambda s, q, k, v: attend.step(s, q, k, v, projection=w))
  for t in range(prompt, length):
    out_t, state = step(state, q[:, t], k[:, t], v[:, t])
    np.testing.assert_allclose(out_t, full[:, t], atol=1e-5, rtol=1e-5)
  # From an empty state, token by token (a masked token is skipped by the ring).
  state = attend.init_state(2, 2, 8, 8, projection=w, max_length=length)
  masked_step = jax.jit(lambda s, q, k, v, m: attend.step(s, q, k, v, mask=m, projection=w))
  for t in range(length):
    out_t, state = masked_step(state, q[:, t], k[:, t], v[:, t], mask[:, t])
    np.testing.assert_allclose(out_t[0], full[0, t], atol=1e-5, rtol=1e-5)
    if t >= 3:
      np.testing.assert_allclose(out_t[1], full[1, t], atol=1e-5, rtol=1e-5)


def test_window_gain_is_a_trainable_feature_param():
  from flax import nnx

  attend = attention.build('hedgehog', head_dim=8, num_heads=2, window=4, rngs=nnx.Rngs(0))
  params = nnx.state(attend, attention.FeatureParam)
  assert 'window_log_gain' in params
  q, k, v = _qkv(jax.random.PRNGKey(5), length=12)

  graphdef, feature_params, rest = nnx.split(attend, attention.FeatureParam, ...)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p, rest)(q, k, v, causal=True) ** 2)

  grad = jax.grad(loss)(feature_params)['window_log_gain'][...]
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  # A gain of g multiplies the window's scores: the dense reference agrees.
  attend.window_log_gain[...] = jnp.full((2,), np.log(3.0))
  ref = dense_reference('hedgehog', q, k, v, None, window=4, causal=True, gain=3.0)
  np.testing.assert_allclose(attend(q, k, v, causal=True), ref, atol=2e-5, rtol=2e-5)


def test_window_zero_is_todays_attention_and_bad_values_raise():
  q, k, v = _qkv(jax.random.PRNGKey(6), length=16)
  w = _features()
  plain = attention.get_attention('favor_softmax', chunk_size=4)(q, k, v, causal=True, projection=w)
  zero = attention.get_attention('favor_softmax', chunk_size=4, window=0)(
    q, k, v, causal=True, projection=w
  )
  np.testing.assert_array_equal(plain, zero)
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match='window must be an integer'):
      attention.get_attention('favor_softmax', window=bad)


def test_window_weights_match_the_dense_reference():
  q, k, v = _qkv(jax.random.PRNGKey(7), length=14)
  w = _features()
  attend = attention.build('favor_softmax', head_dim=8, num_heads=2, window=3, projection=w)
  weights = attend.weights(q, k, causal=True)
  ref = dense_reference('favor_softmax', q, k, v, w, window=3, causal=True)
  out = np.einsum('bhls,bshd->blhd', np.asarray(weights, np.float64), np.asarray(v, np.float64))
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_hybrid_parameter_paths_are_those_of_saved_checkpoints():
  """A llama-family hybrid keeps the variable paths its checkpoints were saved under
  (e.g. workdirs/linearize_smollm2, Hedgehog + window 64): the feature map and the gains
  directly under `attend`; window_off and a sparse cache change none of them."""
  import ml_collections
  from flax import nnx

  from performer import models

  def attend_paths(**options):
    config = ml_collections.ConfigDict(
      dict(
        family='llama', vocab_size=13, num_layers=1, num_heads=2, num_kv_heads=1, emb_dim=16,
        mlp_dim=32, max_len=32, positions='rotary',
        attention=dict(kind='hedgehog', chunk_size=4, **options),
      )
    )  # fmt: skip
    model = models.build_model(config, rngs=nnx.Rngs(params=0, dropout=1))
    flat = nnx.to_flat_state(nnx.state(model))
    return {
      '.'.join(map(str, path[3:])): (type(var).__name__, var.shape)
      for path, var in flat
      if path[:3] == ('layers', 0, 'attn') and path[3] == 'attend'
    }

  hedgehog = {
    f'attend.feature_map.{side}_{name}': ('FeatureParam', shape)
    for side in ('query', 'key')
    for name, shape in (('weight', (2, 8, 8)), ('bias', (2, 8)))
  }
  gains = {
    'attend.window_log_gain': ('FeatureParam', (2,)),
    'attend.sink_log_gain': ('FeatureParam', (2,)),
  }
  assert attend_paths() == hedgehog
  assert attend_paths(window=4, sinks=2) == {**hedgehog, **gains}
  assert attend_paths(window=4, sinks=2, window_off=True) == {**hedgehog, **gains}
  window_only = {**hedgehog, 'attend.window_log_gain': gains['attend.window_log_gain']}
  assert attend_paths(window=4) == window_only
  assert attend_paths(window=4, window_off=True) == window_only
  assert attend_paths(window=4, sparse_cache=2) == window_only
