"""Exact softmax, random features, the FAVOR+ estimator, numerics, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import DEFAULT_NEW_KIND, kind_params
from performer import attention


def _qkv(key, b=2, length=16, h=2, d=8, scale=0.5):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    jax.random.normal(kq, (b, length, h, d)) * scale,
    jax.random.normal(kk, (b, length, h, d)) * scale,
    jax.random.normal(kv, (b, length, h, d)),
  )


# --- exact softmax -----------------------------------------------------------


@pytest.mark.parametrize('causal', [False, True])
def test_reference_matches_dot_product_attention(causal):
  q, k, v = _qkv(jax.random.PRNGKey(0), length=33)
  ref = attention.softmax_reference(q, k, v, causal=causal)
  fast = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  np.testing.assert_allclose(ref, fast, atol=1e-5, rtol=1e-5)
  ours = attention.get_attention('softmax')(q, k, v, causal=causal)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_softmax_mask_and_segments_match_reference():
  q, k, v = _qkv(jax.random.PRNGKey(1), length=12)
  seg = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [3] * 12])
  mask = seg > 0
  for causal in (False, True):
    fast = attention.get_attention('softmax')(q, k, v, causal=causal, mask=mask, segment_ids=seg)
    ref = attention.get_attention('softmax', implementation='reference')(
      q, k, v, causal=causal, mask=mask, segment_ids=seg
    )
    np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=1e-5)


# --- random features ---------------------------------------------------------


def test_orthogonal_blocks_and_norms():
  w = attention.draw_projection(jax.random.PRNGKey(0), 40, 16)
  assert w.shape == (40, 16)
  block = np.asarray(w[:16])
  unit = block / np.linalg.norm(block, axis=1, keepdims=True)
  np.testing.assert_allclose(unit @ unit.T, np.eye(16), atol=1e-5)
  sqrt = attention.draw_projection(jax.random.PRNGKey(0), 40, 16, feature_norms='sqrt')
  np.testing.assert_allclose(np.linalg.norm(sqrt, axis=1), 4.0, rtol=1e-5)
  # chi(d) norms vary and have mean close to sqrt(d).
  norms = np.linalg.norm(attention.draw_projection(jax.random.PRNGKey(1), 4096, 16), axis=1)
  assert norms.std() > 0.3 and abs(norms.mean() - 4.0) < 0.1
  # Same directions for both norm options: the norms use an independent key.
  np.testing.assert_allclose(unit, np.asarray(sqrt[:16]) / 4.0, atol=1e-5)


def test_sign_fix_makes_rows_unbiased():
  draws = jax.vmap(lambda k: attention.draw_projection(k, 4, 4))(
    jax.random.split(jax.random.PRNGKey(2), 4000)
  )
  # Haar rows have mean zero; QR without the sign fix does not.
  assert np.abs(np.asarray(draws).mean(0)).max() < 0.1


def test_iid_and_per_head_features():
  iid = attention.draw_projection(jax.random.PRNGKey(3), 8, 4, orthogonal=False)
  assert iid.shape == (8, 4)
  heads = attention.draw_projection(jax.random.PRNGKey(3), 8, 4, num_heads=3)
  assert heads.shape == (3, 8, 4)
  assert not np.allclose(heads[0], heads[1])


def test_redraw_features_keeps_structure_and_metadata():
  class Layer(nnx.Module):
    def __init__(self):
      self.w = attention.RandomProjection(
        attention.draw_projection(jax.random.PRNGKey(0), 8, 4, num_heads=2),
        orthogonal=False,
        feature_norms='chi',
      )
      self.dense = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

  layer = Layer()
  _, rf, params = nnx.split(layer, attention.RandomProjection, nnx.Param)
  assert 'w' in rf and 'w' not in params
  new = jax.jit(attention.redraw_projections)(rf, jax.random.PRNGKey(5))
  again = attention.redraw_projections(rf, jax.random.PRNGKey(5))
  assert new['w'][...].shape == (2, 8, 4)
  assert not np.allclose(new['w'][...], rf['w'][...])
  np.testing.assert_array_equal(new['w'][...], again['w'][...])
  assert new['w'].get_metadata()['orthogonal'] is False


# --- the estimator -----------------------------------------------------------


def _kernel_estimate(q, k, key, m, orthogonal, kind='favor_softmax'):
  w = attention.draw_projection(key, m, q.shape[-1], orthogonal=orthogonal)
  phi_q, phi_k = attention.get_attention(kind).features(q, k, projection=w)
  return jnp.einsum('blhm,bshm->bhls', phi_q, phi_k)


@pytest.mark.parametrize('kind', ['favor_softmax', 'favor_hyperbolic', 'favor_trig'])
def test_softmax_kernel_estimate_is_unbiased(kind):
  q, k, _ = _qkv(jax.random.PRNGKey(4), b=1, length=6, h=1, d=4, scale=0.7)
  exact = jnp.exp(jnp.einsum('blhd,bshd->bhls', q, k) / 2.0)
  keys = jax.random.split(jax.random.PRNGKey(5), 4000)
  draws = np.asarray(
    jax.vmap(lambda kk: _kernel_estimate(q, k, kk, 8, False, kind))(keys), np.float64
  )
  # Unbiased: the mean over independent draws is within 4 standard errors.
  standard_error = draws.std(0) / np.sqrt(len(draws))
  assert np.all(np.abs(draws.mean(0) - exact) < 4 * standard_error + 1e-6)
  # And close in relative terms on average.
  assert np.mean(np.abs(draws.mean(0) / exact - 1)) < 0.03


@pytest.mark.slow
def test_attention_error_shrinks_with_m_and_orthogonal_beats_iid():
  q, k, v = _qkv(jax.random.PRNGKey(6), b=1, length=32, h=1, d=16, scale=0.4)
  exact = attention.softmax_reference(q, k, v, causal=False)
  attend = attention.get_attention('favor_softmax')

  def mean_error(m, orthogonal):
    errors = []
    for seed in range(20):
      w = attention.draw_projection(jax.random.PRNGKey(100 + seed), m, 16, orthogonal=orthogonal)
      out = attend(q, k, v, causal=False, projection=w)
      errors.append(float(jnp.mean((out - exact) ** 2)))
    return np.mean(errors)

  errors = [mean_error(m, True) for m in (16, 64, 256)]
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 0.25 * errors[0]
  for m in (16, 64):
    assert mean_error(m, True) < mean_error(m, False)


# --- numerics ------------------------------------------------------------------


@pytest.mark.parametrize('kind', kind_params(attention.KINDS, keep=DEFAULT_NEW_KIND))
@pytest.mark.parametrize('causal', [False, True])
def test_gradients_are_finite(kind, causal):
  q, k, v = _qkv(jax.random.PRNGKey(7), length=20, scale=2.0)
  w = attention.draw_projection(jax.random.PRNGKey(8), 16, 8)
  attend = attention.get_attention(kind, chunk_size=8)
  mask = jnp.arange(20)[None] < jnp.array([[20], [13]])
  grads = jax.grad(
    lambda q, k, v: jnp.sum(attend(q, k, v, causal=causal, mask=mask, projection=w) ** 2), (0, 1, 2)
  )(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize(
  'kind', kind_params([k for k in attention.KINDS if k not in ('softmax', 'identity')])
)
@pytest.mark.parametrize('causal', [False, True])
def test_bf16_long_large_norm_inputs_stay_finite(kind, causal):
  length, d = 16384, 16
  q, k, v = _qkv(
    jax.random.PRNGKey(9), b=1, length=length, h=1, d=d, scale=8.0
  )  # |q|, |k| ~ 32: exp(q.k/sqrt(d)) overflows f32
  w = attention.draw_projection(jax.random.PRNGKey(10), 32, d)
  attend = attention.get_attention(kind, num_features=32, chunk_size=256)
  out = jax.jit(lambda q, k, v: attend(q, k, v, causal=causal, projection=w))(
    q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  )
  assert out.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_normalise_gradient_matches_autodiff_of_division():
  """normalise has a hand-written VJP (a contraction, for XLA:CPU speed)."""
  from jax.test_util import check_grads

  from performer.attention import linear

  num = jax.random.normal(jax.random.PRNGKey(3), (1, 2, 5, 4))
  den = jnp.abs(jax.random.normal(jax.random.PRNGKey(4), (1, 2, 5))) + 0.5
  den = den.at[0, 1, 2].set(-0.7)  # trig features: negative normalisers
  check_grads(
    lambda n, d: linear.normalise(n, d, 1e-6),
    (num, den),
    order=1,
    modes=('rev',),
    atol=2e-2,
    rtol=2e-2,
  )
  plain = jax.grad(
    lambda n, d: jnp.sum(jnp.sin(n / jnp.where(d >= 0, d + 1e-6, d - 1e-6)[..., None])), (0, 1)
  )(num, den)
  ours = jax.grad(lambda n, d: jnp.sum(jnp.sin(linear.normalise(n, d, 1e-6))), (0, 1))(num, den)
  for a, b in zip(plain, ours):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_large_norm_keys_do_not_underflow_causal():
  """The running maximum keeps large-norm keys (|k|^2/2 >> 88) usable."""
  q, k, v = _qkv(jax.random.PRNGKey(11), b=1, length=64, h=1, d=16, scale=6.0)
  w = attention.draw_projection(jax.random.PRNGKey(12), 64, 16)
  attend = attention.get_attention('favor_softmax', chunk_size=16)
  out = attend(q, k, v, causal=True, projection=w)
  scan = attention.get_attention('favor_softmax', causal_impl='scan')(
    q, k, v, causal=True, projection=w
  )
  assert np.all(np.isfinite(np.asarray(out)))
  assert np.abs(np.asarray(out)).max() > 1e-3
  np.testing.assert_allclose(out, scan, atol=1e-4, rtol=1e-4)


# --- errors ----------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
  q, k, v = _qkv(jax.random.PRNGKey(0))
  w = attention.draw_projection(jax.random.PRNGKey(1), 16, 8)
  attend = attention.get_attention('favor_softmax')
  with pytest.raises(ValueError, match="unknown attention kind 'favx'.*softmax"):
    attention.get_attention('favx')
  with pytest.raises(ValueError, match='unknown attention option'):
    attention.get_attention('softmax', num_featurez=3)
  with pytest.raises(ValueError, match='must match in batch, length and head_dim'):
    attend(q, k[..., :4], v, causal=True, projection=w)
  with pytest.raises(ValueError, match='v .* does not match k'):  # 1 kv head, v with all
    attend(q, k[:, :, :1], v, causal=True, projection=w)
  with pytest.raises(ValueError, match='v .* does not match'):
    attend(q, k, v[:, :5], causal=True, projection=w)
  with pytest.raises(ValueError, match=r'q must be \[batch, length, heads'):
    attend(q[0], k, v, causal=True, projection=w)
  with pytest.raises(ValueError, match='mask must have shape'):
    attend(q, k, v, causal=True, mask=jnp.ones((2, 5), bool), projection=w)
  with pytest.raises(ValueError, match='mask must be bool'):
    attend(q, k, v, causal=True, mask=jnp.ones((2, 16)), projection=w)
  with pytest.raises(ValueError, match='segment_ids must have shape'):
    attend(q, k, v, causal=True, segment_ids=jnp.ones((1, 16), jnp.int32), projection=w)
  with pytest.raises(ValueError, match='needs a random feature matrix'):
    attend(q, k, v, causal=True)
  with pytest.raises(ValueError, match='projection must be'):
    attend(q, k, v, causal=True, projection=w[:, :4])
  with pytest.raises(ValueError, match='feature_norms'):
    attention.get_attention('favor_softmax', feature_norms='unit')
  with pytest.raises(ValueError, match='pass max_length'):
    attention.get_attention('softmax').init_state(1, 2, 8, 8)
