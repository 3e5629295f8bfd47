"""The `sinks` option: the first s tokens of each segment attended exactly, with a gain of
their own, under the one normaliser of the window and the linear part (attention/sinks.py)."""

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

# (kind, causal): FAVOR+ causal and Hedgehog bidirectional by default, the rest under -m slow
MODES = [('favor_softmax', True), ('hedgehog', False)] + [
  pytest.param(kind, causal, marks=pytest.mark.slow)
  for kind, causal in (
    ('favor_softmax', False),
    ('hedgehog', True),
    ('favor_relu', True),
    ('linear_elu', True),
    ('favor_sharp', True),
    ('favor_trig', True),
  )
]


def sink_flags(mask, segment_ids, sinks):
  """numpy: the first `sinks` valid tokens of each segment."""
  mask, seg = np.asarray(mask), np.asarray(segment_ids)
  flags = np.zeros(mask.shape, bool)
  for b in range(mask.shape[0]):
    count = 0
    for i in range(mask.shape[1]):
      if i and seg[b, i] != seg[b, i - 1]:
        count = 0
      if mask[b, i]:
        count += 1
        flags[b, i] = count <= sinks
  return flags


def dense_reference(kind, q, k, v, w, *, window, sinks, causal, mask, segment_ids, gains=(1, 1)):
  """float64: g_s exp(q.k/sqrt(d)) on sink keys, g exp(.) in the window, phi(q).phi(k)
  elsewhere, normalised once."""
  pq, pk = (
    np.asarray(x, np.float64)
    for x in attention.get_attention(kind).features(
      q, k, causal=causal, mask=mask, segment_ids=segment_ids, projection=w
    )
  )
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  exact = np.exp(np.einsum('blhd,bshd->bhls', qn, kn) / np.sqrt(q.shape[-1]))
  linear = np.einsum('blhm,bshm->bhls', pq, pk)
  length = q.shape[1]
  gap = np.arange(length)[:, None] - np.arange(length)[None, :]
  in_band = ((gap >= 0) & (gap < window)) if causal else (np.abs(gap) < window)
  is_sink = sink_flags(mask, segment_ids, sinks)[:, None, None, :]
  scores = np.where(is_sink, gains[1] * exact, np.where(in_band, gains[0] * exact, linear))
  out = normalised_reference(scores, v, causal, mask, segment_ids)
  return out * np.asarray(mask)[:, :, None, None]  # padded queries give zeros


def _packed(length=29):
  """Two segments then padding in row 0; row 1 one segment with 2 left-padded tokens."""
  first = length * 2 // 5
  seg = jnp.array([[1] * first + [2] * (length - first - 4) + [0] * 4, [3] * length])
  return seg, (seg > 0).at[1, :2].set(False)


@pytest.mark.parametrize('kind, causal', MODES)
def test_sinks_equal_the_dense_reference_with_mask_and_segments(kind, causal):
  q, k, v = _qkv(jax.random.PRNGKey(0), length=29)
  w = _features()
  seg, mask = _packed()
  for window, sinks, chunk in ((0, 2, 8), (4, 3, 5)):
    attend = attention.get_attention(kind, window=window, sinks=sinks, chunk_size=chunk, eps=0.0)
    out = jax.jit(
      lambda q, k, v: attend(q, k, v, causal=causal, mask=mask, segment_ids=seg, projection=w)
    )(q, k, v)
    ref = dense_reference(
      kind, q, k, v, w, window=window, sinks=sinks, causal=causal, mask=mask, segment_ids=seg
    )
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5, err_msg=f'{window=} {sinks=}')


@pytest.mark.parametrize('causal', [True, False])
def test_one_segment_path_equals_the_packed_path(causal):
  """Without segment ids every query shares its row's sinks (one gather); with all-zero
  segment ids each query gathers its segment's: the same outputs."""
  q, k, v = _qkv(jax.random.PRNGKey(8), length=20)
  mask = jnp.ones((2, 20), bool).at[1, :4].set(False)
  attend = attention.get_attention('favor_softmax', window=3, sinks=3, chunk_size=8)
  run = jax.jit(
    lambda seg: attend(q, k, v, causal=causal, mask=mask, segment_ids=seg, projection=_features())
  )
  np.testing.assert_allclose(run(None), run(jnp.zeros((2, 20), jnp.int32)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('causal', [True, False])
def test_sinks_with_a_window_covering_the_sequence_are_exact_softmax(causal):
  """Both gains start at 1: sinks taken out of the window change nothing."""
  q, k, v = _qkv(jax.random.PRNGKey(1), length=21)
  seg, mask = _packed(21)
  exact = attention.get_attention('softmax', implementation='reference')
  want = exact(q, k, v, causal=causal, mask=mask, segment_ids=seg)
  attend = attention.get_attention('hedgehog', window=21, sinks=3, chunk_size=8)
  got = jax.jit(lambda q, k, v: attend(q, k, v, causal=causal, mask=mask, segment_ids=seg))(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  'kind, window', [('favor_softmax', 6), ('hedgehog', 0), ('favor_softmax', 0)]
)
def test_sinks_are_exactly_causal(kind, window):
  q, k, v = _qkv(jax.random.PRNGKey(2), length=40)
  w = _features()
  seg = jnp.array([[1] * 17 + [2] * 23, [1] * 40])
  mask = jnp.ones((2, 40), bool).at[1, :3].set(False)
  attend = attention.get_attention(kind, window=window, sinks=3, chunk_size=8)
  fn = jax.jit(
    lambda q, k, v: attend(q, k, v, causal=True, mask=mask, segment_ids=seg, projection=w)
  )
  assert_future_leaves_past_unchanged(fn, q, k, v, (0, 2, 4, 17, 18, 38))


@pytest.mark.parametrize('window', [4, 0])
def test_sinks_decode_equals_forward(window):
  """Prefill (row 1 left-padded by 3, so its sinks start at 3) then one step per token;
  and from an empty state token by token, the sinks filling while the ring evicts."""
  length, prompt, sinks = 19, 7, 2
  q, k, v = _qkv(jax.random.PRNGKey(4), length=length)
  w = _features()
  attend = attention.get_attention('favor_softmax', window=window, sinks=sinks, chunk_size=4)
  mask = jnp.ones((2, length), bool).at[1, :3].set(False)
  full = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, mask=mask, projection=w))(q, k, v)
  state = attend.init_state(2, 2, 8, 8, projection=w)
  assert state['sinks']['k'].shape == (2, sinks, 2, 8)
  prefill = jax.jit(lambda s, q, k, v, m: attend.prefill(s, q, k, v, mask=m, projection=w))
  out, state = prefill(state, q[:, :prompt], k[:, :prompt], v[:, :prompt], mask[:, :prompt])
  np.testing.assert_allclose(out, full[:, :prompt], atol=1e-5, rtol=1e-5)
  step = jax.jit(lambda s, q, k, v, m: attend.step(s, q, k, v, mask=m, projection=w))
  for t in range(prompt, length):
    out_t, state = step(state, q[:, t], k[:, t], v[:, t], mask[:, t])
    np.testing.assert_allclose(out_t, full[:, t], atol=1e-5, rtol=1e-5)
  state = attend.init_state(2, 2, 8, 8, projection=w)
  for t in range(length):
    out_t, state = step(state, q[:, t], k[:, t], v[:, t], mask[:, t])
    np.testing.assert_allclose(out_t[0], full[0, t], atol=1e-5, rtol=1e-5)
    if t >= 3:
      np.testing.assert_allclose(out_t[1], full[1, t], atol=1e-5, rtol=1e-5)


def test_sinks_multi_turn_prefill_across_the_sinks():
  """Turns of 2, 3 and 7 tokens with 3 sinks and row 0 left-padded by 1: the sinks
  straddle the turns; each turn continues from the last one's state."""
  attend = attention.get_attention('hedgehog', window=3, sinks=3, chunk_size=4)
  q, k, v = _qkv(jax.random.PRNGKey(5), length=12)
  mask = jnp.ones((2, 12), bool).at[0, :1].set(False)
  fresh = attend.init_state(2, 2, 8, 8)
  prefill = jax.jit(lambda s, q, k, v, m: attend.prefill(s, q, k, v, mask=m))
  once, _ = prefill(fresh, q, k, v, mask)
  forward = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, mask=mask))
  np.testing.assert_allclose(once, forward(q, k, v), atol=1e-5, rtol=1e-5)
  state, outs = fresh, []
  for lo, hi in ((0, 2), (2, 5), (5, 12)):
    out, state = prefill(state, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mask[:, lo:hi])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), once, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(state['sinks']['valid'], True)


def test_sink_gain_is_trainable_and_weights_match_the_reference():
  from flax import nnx

  attend = attention.build('hedgehog', head_dim=8, num_heads=2, window=3, sinks=2, rngs=nnx.Rngs(0))
  q, k, v = _qkv(jax.random.PRNGKey(6), length=12)
  graphdef, feature_params, rest = nnx.split(attend, attention.FeatureParam, ...)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p, rest)(q, k, v, causal=True) ** 2)

  grad = jax.jit(jax.grad(loss))(feature_params)['sink_log_gain'][...]
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  attend.sink_log_gain[...] = jnp.full((2,), np.log(3.0))
  attend.window_log_gain[...] = jnp.full((2,), np.log(0.5))
  seg, mask = jnp.zeros((2, 12), jnp.int32), jnp.ones((2, 12), bool)
  ref = dense_reference(
    'hedgehog', q, k, v, None, window=3, sinks=2, causal=True, mask=mask, segment_ids=seg,
    gains=(0.5, 3.0),
  )  # fmt: skip
  np.testing.assert_allclose(attend(q, k, v, causal=True), ref, atol=2e-5, rtol=2e-5)
  weights = np.asarray(attend.weights(q, k, causal=True), np.float64)
  out = np.einsum('bhls,bshd->blhd', weights, np.asarray(v, np.float64))
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_sinks_zero_is_todays_attention_and_bad_values_raise():
  q, k, v = _qkv(jax.random.PRNGKey(7), length=16)
  w = _features()
  for window in (0, 4):
    plain = attention.get_attention('favor_softmax', chunk_size=4, window=window)
    zero = attention.get_attention('favor_softmax', chunk_size=4, window=window, sinks=0)
    np.testing.assert_array_equal(
      plain(q, k, v, causal=True, projection=w), zero(q, k, v, causal=True, projection=w)
    )
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match='sinks must be an integer'):
      attention.get_attention('favor_softmax', sinks=bad)
