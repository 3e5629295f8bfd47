"""Adaptive and learnable feature maps: FAVOR++, FAVOR# and Hedgehog.

The kind-generic properties (chunked == scan == quadratic form, bitwise no
future leak, masks, packed segments, decode == forward, gradients, bf16) run
for these kinds through the KINDS-parametrised tests of test_attention*.py,
test_models.py and test_decode.py. This file checks what is particular to
them: the estimator (unbiased for any A, lower variance than FAVOR+), the
running statistics of the causal case, and Hedgehog's trainable map.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from performer import attention
from performer.attention import favor_plus_plus

ADAPTIVE = ('favor_plus_plus', 'favor_sharp')


def _qkv(key, b=2, length=24, h=2, d=8, scale=0.5):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    jax.random.normal(kq, (b, length, h, d)) * scale,
    jax.random.normal(kk, (b, length, h, d)) * scale,
    jax.random.normal(kv, (b, length, h, d)),
  )


def _kernel_draws(kind, q, k, a, num_draws=4000, m=8, seed=5):
  """phi(q).phi(k) [draws, B, H, L, L] for iid feature draws, with A forced to
  `a` (None: the map's own calibration from q and k)."""
  d, h = q.shape[-1], q.shape[-2]

  def one(key):
    w = attention.draw_projection(key, m, d, orthogonal=False)
    fmap = attention.get_attention(kind).bind(d, h, w).feature_map
    ctx = fmap.calibrate(q, k, causal=False)
    if a is not None:
      ctx = favor_plus_plus.context(jnp.full_like(ctx['a'], a), d, ctx['psi'])
    return jnp.einsum('bhlm,bhsm->bhls', fmap.exact_query(q, ctx), fmap.exact_key(k, ctx))

  keys = jax.random.split(jax.random.PRNGKey(seed), num_draws)
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


@pytest.mark.parametrize('kind', ADAPTIVE)
@pytest.mark.parametrize(
  'a',
  [
    pytest.param(0.0, marks=pytest.mark.slow),
    pytest.param(-0.3, marks=pytest.mark.slow),
    -1.0,
    None,
  ],
)
def test_estimate_is_unbiased_for_any_a(kind, a):
  q, k, _ = _qkv(jax.random.PRNGKey(4), b=1, length=6, h=1, d=4, scale=0.7)
  exact = np.exp(np.einsum('blhd,bshd->bhls', q, k) / 2.0)
  draws = _kernel_draws(kind, q, k, a)
  standard_error = draws.std(0) / np.sqrt(len(draws))
  assert np.all(np.abs(draws.mean(0) - exact) < 4 * standard_error + 1e-6)


def test_optimal_a_solves_the_variance_equation():
  rho = jnp.array([0.0, 0.1, 1.0, 3.0, 50.0])
  a = favor_plus_plus.optimal_a(rho)
  # The stationary point of the second moment: 16 A^2 - (2 - 4 rho) A - rho = 0.
  residual = (16 * a**2 - (2 - 4 * rho) * a - rho) / (1 + rho) ** 2  # float32 scale
  np.testing.assert_allclose(residual, 0.0, atol=1e-6)
  assert np.all(np.asarray(a) <= 0) and float(a[0]) == 0.0
  np.testing.assert_allclose(a[-1], -50.0 / 4, rtol=0.05)  # ~ -rho/4 for large rho


def _norm_three_pairs(key, length=8, d=16):
  """q, k whose scaled rows x = q / d^(1/4) have |x|^2 = 3."""
  kq, kk = jax.random.split(key)

  def rows(k):
    x = jax.random.normal(k, (1, length, 1, d))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True) * jnp.sqrt(3.0) * d**0.25

  return rows(kq), rows(kk)


@pytest.mark.parametrize('kind', ADAPTIVE)
def test_variance_lower_than_favor_plus_with_the_same_draws(kind):
  q, k = _norm_three_pairs(jax.random.PRNGKey(11))
  ours = _kernel_draws(kind, q, k, None, num_draws=3000, m=16)
  plus = _kernel_draws(kind, q, k, 0.0, num_draws=3000, m=16)  # A = 0: FAVOR+
  exact = np.exp(np.einsum('blhd,bshd->bhls', q, k) / 4.0)
  # Relative variance per pair, averaged over the 64 query-key pairs.
  rel_ours = (ours.var(0) / exact**2).mean()
  rel_plus = (plus.var(0) / exact**2).mean()
  assert rel_ours < 0.9 * rel_plus, (rel_ours, rel_plus)


def test_favor_sharp_alignment_keeps_dot_products_and_balances_norms():
  q, k, _ = _qkv(jax.random.PRNGKey(3), b=1, length=32, h=1, d=8)
  q = q * jnp.array([4.0, 1, 1, 1, 1, 1, 1, 0.25])  # anisotropic queries
  fmap = (
    attention.get_attention('favor_sharp')
    .bind(8, 1, attention.draw_projection(jax.random.PRNGKey(0), 8, 8))
    .feature_map
  )
  ctx = fmap.calibrate(q, k, causal=False)
  xq, yk = fmap._aligned(q, ctx, False), fmap._aligned(k, ctx, True)  # pylint: disable=protected-access
  np.testing.assert_allclose(
    jnp.einsum('bqhd,bkhd->bqk', xq, yk),
    jnp.einsum('bqhd,bkhd->bqk', q, k) / jnp.sqrt(8.0),
    rtol=1e-4,
    atol=1e-5,
  )
  # Per dimension, E[x_l^2] and E[y_l^2] become equal.
  np.testing.assert_allclose(jnp.mean(xq**2, axis=(0, 1)), jnp.mean(yk**2, axis=(0, 1)), rtol=1e-4)


# --- running statistics (causal) ----------------------------------------------


def _module(kind, h=2, d=8, m=16):
  return attention.build(
    kind, head_dim=d, num_heads=h, rngs=nnx.Rngs(0), num_features=m, chunk_size=4
  )


def _train_call(module, q, k, v, **kwargs):
  nnx.view(module, use_running_average=False)(q, k, v, causal=True, **kwargs)


@pytest.mark.parametrize('kind', ADAPTIVE)
def test_causal_uses_only_earlier_batches_statistics(kind):
  q, k, v = _qkv(jax.random.PRNGKey(0), scale=1.0)
  module = _module(kind)
  plus = attention.get_attention('favor_softmax', chunk_size=4)
  w = module.feature_map.projection[...]
  # Without statistics the map is exactly FAVOR+.
  np.testing.assert_allclose(
    module(q, k, v, causal=True), plus(q, k, v, causal=True, projection=w), atol=1e-6
  )
  assert float(module.feature_map.weight[...]) == 0.0
  # A training call updates the statistics (eval calls never do)...
  before = module(q, k, v, causal=True)
  _train_call(module, q, k, v)
  stats = np.asarray(module.feature_map.moments[...])
  assert float(module.feature_map.weight[...]) > 0
  module(q * 3, k, v, causal=True)
  np.testing.assert_array_equal(module.feature_map.moments[...], stats)
  # ...but the training call's own output used the earlier (empty) statistics,
  after = module(q, k, v, causal=True)
  assert not np.allclose(after, before, atol=1e-4)
  # and A now comes from them: negative, one per head.
  ctx = module.feature_map.calibrate(q, k, causal=True)
  assert ctx['a'].shape == (1, 1, 2) and np.all(np.asarray(ctx['a']) < 0)


@pytest.mark.parametrize('kind', ADAPTIVE)
@pytest.mark.parametrize('training', [False, True])
def test_no_future_leak_with_statistics(kind, training):
  q, k, v = _qkv(jax.random.PRNGKey(2), length=40, scale=1.0)
  module = _module(kind)
  _train_call(module, q, k, v)  # non-trivial statistics
  graphdef, state = nnx.split(module)

  @jax.jit
  def fn(q, k, v):
    m = nnx.merge(graphdef, state, copy=True)
    if training:
      m.set_attributes(use_running_average=False)
    return m(q, k, v, causal=True)

  base = np.asarray(fn(q, k, v))
  noise = jax.random.normal(jax.random.PRNGKey(3), q.shape)
  for t in (0, 7, 21, 38):
    future = jnp.arange(40)[None, :, None, None] > t
    for cq, ck, cv in (
      (jnp.where(future, q + 3 * noise, q), k, v),
      (q, jnp.where(future, k * 6, k), v),
      (q, k, jnp.where(future, v + noise, v)),
    ):
      out = np.asarray(fn(cq, ck, cv))
      np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])


@pytest.mark.parametrize('kind', ADAPTIVE + ('hedgehog',))
def test_decode_equals_forward_with_state(kind):
  q, k, v = _qkv(jax.random.PRNGKey(8), length=19, scale=1.0)
  module = _module(kind)
  if kind == 'hedgehog':  # move W off the identity
    fmap = module.feature_map
    fmap.query_weight[...] = fmap.query_weight[...] + 0.3 * jax.random.normal(
      jax.random.PRNGKey(1), fmap.query_weight.shape
    )
  else:
    _train_call(module, q, k, v)
  graphdef, variables = nnx.split(module)
  call = lambda name, *args: getattr(nnx.merge(graphdef, variables), name)(*args)
  full = jax.jit(lambda q, k, v: nnx.merge(graphdef, variables)(q, k, v, causal=True))(q, k, v)
  state = module.init_state(2, 8)
  out, state = jax.jit(functools.partial(call, 'prefill'))(state, q[:, :7], k[:, :7], v[:, :7])
  np.testing.assert_allclose(out, full[:, :7], atol=1e-5, rtol=1e-5)
  step = jax.jit(functools.partial(call, 'step'))
  for t in range(7, 19):
    out_t, state = step(state, q[:, t], k[:, t], v[:, t])
    np.testing.assert_allclose(out_t, full[:, t], atol=1e-5, rtol=1e-5)


def test_stats_decay_is_validated():
  with pytest.raises(ValueError, match='stats_decay'):
    attention.build('favor_plus_plus', head_dim=8, num_heads=1, rngs=nnx.Rngs(0), stats_decay=1.0)


# --- Hedgehog -------------------------------------------------------------------


def test_hedgehog_owns_trainable_parameters_not_random_features():
  module = _module('hedgehog')
  params = nnx.state(module, attention.FeatureParam)
  leaves = jax.tree.leaves(params)
  assert len(leaves) == 4 and leaves  # query/key weight and bias
  assert jax.tree.leaves(nnx.state(module, attention.RandomProjection)) == []
  assert not attention.get_attention('hedgehog').uses_projection
  np.testing.assert_array_equal(module.feature_map.query_weight[0], np.eye(8))
  assert module.feature_map.num_features == 16
  wide = attention.build('hedgehog', head_dim=8, num_heads=2, hedgehog_dim=12)
  assert wide.feature_map.key_weight.shape == (2, 8, 12)
  assert wide.init_state(1, 8)['S'].shape == (1, 2, 24, 8)


@pytest.mark.parametrize('causal', [False, True])
def test_hedgehog_gradients_reach_w(causal):
  q, k, v = _qkv(jax.random.PRNGKey(5), scale=1.0)
  module = _module('hedgehog')
  graphdef, params, rest = nnx.split(module, attention.FeatureParam, ...)

  def loss(p):
    out = nnx.merge(graphdef, p, rest)(q, k, v, causal=causal)
    return jnp.sum(out * v)

  grads = jax.grad(loss)(params)
  fmap = grads['feature_map']
  for name in ('query_weight', 'key_weight', 'query_bias', 'key_bias'):
    g = np.asarray(fmap[name][...])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-6, name


def test_hedgehog_features_are_two_softmaxes():
  q, k, _ = _qkv(jax.random.PRNGKey(6))
  phi_q, phi_k = attention.get_attention('hedgehog').features(q, k)
  assert phi_q.shape == (2, 24, 2, 16)
  np.testing.assert_allclose(phi_q[..., :8].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(phi_k[..., 8:].sum(-1), 1.0, rtol=1e-5)
  x = q / 8**0.25
  np.testing.assert_allclose(phi_q[..., 8:], jax.nn.softmax(-x, axis=-1), rtol=1e-5)
