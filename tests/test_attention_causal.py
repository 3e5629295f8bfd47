"""Causal FAVOR+: chunked == scan == quadratic form, no future leak, masks,
segments, recurrent decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DEFAULT_NEW_KIND, SLOW_KINDS, kind_params
from performer import attention

LINEAR_KINDS = tuple(k for k in attention.KINDS if k not in ('softmax', 'identity'))
ALL_KINDS = attention.KINDS


def _qkv(key, b=2, length=37, h=2, d=8, dv=8, scale=0.5):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    jax.random.normal(kq, (b, length, h, d)) * scale,
    jax.random.normal(kk, (b, length, h, d)) * scale,
    jax.random.normal(kv, (b, length, h, dv)),
  )


def _features(d=8, m=16, seed=1):
  return attention.draw_projection(jax.random.PRNGKey(seed), m, d)


def quadratic_reference(kind, q, k, v, w, *, causal, mask=None, segment_ids=None):
  """The masked quadratic form from the unstabilised feature map."""
  pq, pk = (
    np.asarray(x, np.float64)
    for x in attention.get_attention(kind).features(
      q, k, causal=causal, mask=mask, segment_ids=segment_ids, projection=w
    )
  )
  return normalised_reference(np.einsum('blhm,bshm->bhls', pq, pk), v, causal, mask, segment_ids)


def normalised_reference(scores, v, causal, mask=None, segment_ids=None):
  """float64 (scores [B, H, L, L] restricted to the allowed pairs, row-normalised) @ v."""
  batch, length = scores.shape[0], scores.shape[-1]
  allowed = np.ones((batch, 1, length, length), bool)
  if causal:
    allowed &= np.tril(np.ones((length, length), bool))
  if mask is not None:
    allowed &= np.asarray(mask)[:, None, None, :]
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    allowed &= seg[:, None, :, None] == seg[:, None, None, :]
  scores = np.where(allowed, scores, 0.0)
  num = np.einsum('bhls,bshd->blhd', scores, np.asarray(v, np.float64))
  den = scores.sum(-1).transpose(0, 2, 1)[..., None]
  return num / np.where(den == 0, 1.0, den)


@pytest.mark.parametrize(
  'kind,chunk_size',
  [
    pytest.param(kind, c, marks=pytest.mark.slow) if kind in SLOW_KINDS and c != 5 else (kind, c)
    for kind in LINEAR_KINDS
    for c in (1, 5, 16, 64)
  ],
)
def test_chunked_equals_scan_and_quadratic(kind, chunk_size):
  q, k, v = _qkv(jax.random.PRNGKey(0))
  w = _features()
  # eps=0: the reference has no normaliser eps (it matters for ReLU's small
  # early denominators), and there are no empty rows here.
  chunked = attention.get_attention(kind, chunk_size=chunk_size, eps=0.0)(
    q, k, v, causal=True, projection=w
  )
  scan = attention.get_attention(kind, causal_impl='scan', eps=0.0)(
    q, k, v, causal=True, projection=w
  )
  quad = quadratic_reference(kind, q, k, v, w, causal=True)
  np.testing.assert_allclose(chunked, scan, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(chunked, quad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', LINEAR_KINDS)
def test_bidirectional_equals_quadratic(kind):
  q, k, v = _qkv(jax.random.PRNGKey(1))
  w = _features()
  out = attention.get_attention(kind, eps=0.0)(q, k, v, causal=False, projection=w)
  quad = quadratic_reference(kind, q, k, v, w, causal=False)
  np.testing.assert_allclose(out, quad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', LINEAR_KINDS)
def test_shared_key_is_exact_features_times_one_factor(kind):
  """Bidirectional keys: phi(k) times one positive factor per (batch, head),
  zero on masked keys, finite when every key is masked."""
  _, k, _ = _qkv(jax.random.PRNGKey(2), scale=1.5)
  w = _features()
  fmap = attention.get_attention(kind).bind(8, 2, w).feature_map
  mask = jnp.arange(37)[None, :] < jnp.array([[30], [37]])
  ctx = fmap.calibrate(k, k, causal=False, mask=mask)
  shared = np.asarray(fmap.shared_key(k, mask, ctx), np.float64)
  exact = (
    np.asarray(fmap.exact_key(k, ctx), np.float64) * np.asarray(mask, np.float64)[:, None, :, None]
  )
  nonzero = np.abs(exact) > 1e-30
  ratio = np.where(nonzero, shared / np.where(nonzero, exact, 1.0), np.nan)
  per_head = np.nanmean(ratio, axis=(2, 3), keepdims=True)
  assert np.all(per_head > 0)
  np.testing.assert_allclose(
    np.where(nonzero, ratio, per_head), np.broadcast_to(per_head, ratio.shape), rtol=1e-4
  )
  assert np.all(shared[0, :, 30:] == 0)
  empty = np.asarray(fmap.shared_key(k, jnp.zeros((2, 37), bool), ctx))
  assert np.all(empty == 0)


def _perturb_future(x, t, key, scale=None):
  noise = jax.random.normal(key, x.shape)
  future = jnp.arange(x.shape[1])[None, :, None, None] > t
  changed = x * scale if scale is not None else x + 3.0 * noise
  return jnp.where(future, changed, x)


def assert_future_leaves_past_unchanged(fn, q, k, v, times):
  """Perturbing q, k or v after t (noise, or keys scaled 6x) leaves every output up to t
  bit for bit the same; `base` is returned for further checks."""
  base = np.asarray(fn(q, k, v))
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  for t in times:
    for cq, ck, cv in (
      (_perturb_future(q, t, keys[0]), k, v),
      (q, _perturb_future(k, t, keys[1]), v),
      (q, k, _perturb_future(v, t, keys[2])),
      (q, _perturb_future(k, t, keys[1], scale=6.0), v),
    ):
      np.testing.assert_array_equal(np.asarray(fn(cq, ck, cv))[:, : t + 1], base[:, : t + 1])
  return base


@pytest.mark.parametrize(
  'kind,impl',
  [
    pytest.param(kind, impl, marks=pytest.mark.slow)
    if kind in SLOW_KINDS and impl == 'scan'
    else (kind, impl)
    for kind in ALL_KINDS
    for impl in ('chunked', 'scan')
  ],
)
def test_no_future_leak_bit_exact(kind, impl):
  q, k, v = _qkv(jax.random.PRNGKey(2), length=40)
  w = _features()
  attend = attention.get_attention(kind, chunk_size=8, causal_impl=impl)
  fn = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, projection=w))
  base = np.asarray(fn(q, k, v))
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  for t in (0, 7, 8, 21, 38):
    cases = [
      (_perturb_future(q, t, keys[0]), k, v),
      (q, _perturb_future(k, t, keys[1]), v),
      (q, k, _perturb_future(v, t, keys[2])),
      (q, _perturb_future(k, t, keys[1], scale=6.0), v),  # big future key
      (q, k.at[:, -1].multiply(6.0), v),  # the last key only
    ]
    for cq, ck, cv in cases:
      out = np.asarray(fn(cq, ck, cv))
      np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])


@pytest.mark.parametrize('kind', kind_params(LINEAR_KINDS, keep=DEFAULT_NEW_KIND))
def test_no_future_leak_with_mask_and_segments(kind):
  q, k, v = _qkv(jax.random.PRNGKey(4), length=24)
  w = _features()
  seg = jnp.array([[1] * 10 + [2] * 9 + [0] * 5, [1] * 24])
  mask = seg > 0
  attend = attention.get_attention(kind, chunk_size=4)
  fn = jax.jit(lambda k: attend(q, k, v, causal=True, mask=mask, segment_ids=seg, projection=w))
  base = np.asarray(fn(k))
  for t in (3, 9, 12):
    out = np.asarray(fn(_perturb_future(k, t, jax.random.PRNGKey(5), 6.0)))
    np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])


@pytest.mark.parametrize('kind', kind_params(ALL_KINDS, keep=DEFAULT_NEW_KIND))
@pytest.mark.parametrize('causal', [False, True])
def test_padding(kind, causal):
  q, k, v = _qkv(jax.random.PRNGKey(6), length=20)
  w = _features()
  attend = attention.get_attention(kind, chunk_size=8)
  mask = jnp.arange(20)[None, :] < jnp.array([[14], [20]])
  out = attend(q, k, v, causal=causal, mask=mask, projection=w)
  # A padded key changes nothing: compare with the sequence cut at 14...
  cut = attend(q[:1, :14], k[:1, :14], v[:1, :14], causal=causal, projection=w)
  np.testing.assert_allclose(out[:1, :14], cut, atol=1e-5, rtol=1e-5)
  # ...and with wild values at the padded positions.
  pad = ~mask[..., None, None]
  wild = attend(
    jnp.where(pad, 50.0, q),
    jnp.where(pad, 50.0, k),
    jnp.where(pad, 1e3, v),
    causal=causal,
    mask=mask,
    projection=w,
  )
  np.testing.assert_allclose(wild, out, atol=1e-5, rtol=1e-5)
  # A padded query gives zeros, never NaN; an all-padded row too.
  assert np.all(np.asarray(out[0, 14:]) == 0)
  empty = attend(q, k, v, causal=causal, mask=jnp.zeros((2, 20), bool), projection=w)
  assert np.all(np.asarray(empty) == 0)


@pytest.mark.parametrize('kind', kind_params(ALL_KINDS, keep=DEFAULT_NEW_KIND))
@pytest.mark.parametrize('causal', [False, True])
def test_packed_segments_equal_separate(kind, causal):
  q, k, v = _qkv(jax.random.PRNGKey(7), b=1, length=30)
  w = _features()
  attend = attention.get_attention(kind, chunk_size=8)
  bounds = [(0, 7), (7, 19), (19, 26)]  # then 4 padding positions
  seg = np.zeros((1, 30), np.int32)
  for i, (a, b) in enumerate(bounds):
    seg[0, a:b] = i + 1
  seg = jnp.asarray(seg)
  packed = attend(q, k, v, causal=causal, mask=seg > 0, segment_ids=seg, projection=w)
  for a, b in bounds:
    alone = attend(q[:, a:b], k[:, a:b], v[:, a:b], causal=causal, projection=w)
    np.testing.assert_allclose(packed[:, a:b], alone, atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(packed[:, 26:]) == 0)


@pytest.mark.parametrize(
  'kind', kind_params([k for k in ALL_KINDS if k != 'identity'], keep=DEFAULT_NEW_KIND)
)
def test_recurrent_step_matches_chunked(kind):
  q, k, v = _qkv(jax.random.PRNGKey(8), b=2, length=19)
  w = _features()
  attend = attention.get_attention(kind, chunk_size=4)
  full = attend(q, k, v, causal=True, projection=w)
  prompt = 7
  state = attend.init_state(2, 2, 8, 8, projection=w, max_length=19)
  out, state = attend.prefill(state, q[:, :prompt], k[:, :prompt], v[:, :prompt], projection=w)
  np.testing.assert_allclose(out, full[:, :prompt], atol=1e-5, rtol=1e-5)
  step = jax.jit(lambda s, q, k, v: attend.step(s, q, k, v, projection=w))
  for t in range(prompt, 19):
    out_t, state = step(state, q[:, t], k[:, t], v[:, t])
    np.testing.assert_allclose(out_t, full[:, t], atol=1e-5, rtol=1e-5)
  # Token by token from an empty state gives the same outputs too.
  state = attend.init_state(2, 2, 8, 8, projection=w, max_length=19)
  for t in range(19):
    out_t, state = step(state, q[:, t], k[:, t], v[:, t])
    np.testing.assert_allclose(out_t, full[:, t], atol=1e-5, rtol=1e-5)


def test_favor_state_size_is_constant():
  attend = attention.get_attention('favor_softmax', num_features=16)
  state = attend.init_state(1, 2, 8, 8, projection=_features())
  assert state['S'].shape == (1, 2, 16, 8) and state['z'].shape == (1, 2, 16)
  hyper = attention.get_attention('favor_hyperbolic', num_features=16)
  assert hyper.init_state(1, 2, 8, 8, projection=_features())['S'].shape == (1, 2, 32, 8)
