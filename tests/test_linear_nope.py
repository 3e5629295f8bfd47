"""attention.linear_nope: the feature map sees q, k before rotary positions,
the exact parts (window, sinks, sparse cache) the rotated ones.

* the hybrid's attention matrix is exactly that: beyond the window, ratios of weights
  are those of phi(q0).phi(k0) of the unrotated pair; inside it, of exp(q.k / sqrt(d))
  of the rotated pair; the output is that matrix times v;
* a model's linear attention without exact parts becomes position-free (NoPE): its
  logits do not move when every position shifts, while with RoPE in the map they do;
* attention transfer gives a linear_nope student the teacher's unrotated q, k;
* decoding equals the forward pass (tests/test_sparse_cache.py runs the model cases).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_decode import make_config

from performer import attention, models
from performer.attention.feature_map import FeatureParam
from performer.convert import attention_transfer


def _qk(seed, length=10, heads=2, dim=8):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q, k, q0, k0 = (jax.random.normal(kk, (1, length, heads, dim)) for kk in keys[:4])
  v = jax.random.normal(keys[4], (1, length, heads, dim))
  return q, k, v, q0, k0


def test_hybrid_weights_split_between_rotated_and_unrotated_inputs():
  q, k, v, q0, k0 = _qk(0)
  window, length = 3, q.shape[1]
  attend = attention.get_attention(
    'favor_softmax', window=window, num_features=32, chunk_size=4, linear_nope=True
  )
  w = attend.make_projection(jax.random.PRNGKey(1), q.shape[-1])
  module = attend.bind(q.shape[-1], q.shape[2], w)
  weights = module.weights(q, k, causal=True, linear_qk=(q0, k0))[0]  # [H, L, L]
  phi_q, phi_k = module.features(q0, k0, causal=True)
  kernel = jnp.einsum('qhm,khm->hqk', phi_q[0], phi_k[0])
  exact = jnp.exp(jnp.einsum('qhd,khd->hqk', q[0], k[0]) / np.sqrt(q.shape[-1]))
  i = length - 1
  far, near = (0, 1), (i - 1, i)  # two keys beyond the window, two inside it
  np.testing.assert_allclose(
    weights[:, i, far[0]] / weights[:, i, far[1]],
    kernel[:, i, far[0]] / kernel[:, i, far[1]],
    rtol=1e-4,
  )
  np.testing.assert_allclose(
    weights[:, i, near[0]] / weights[:, i, near[1]],
    exact[:, i, near[0]] / exact[:, i, near[1]],
    rtol=1e-4,
  )
  out = attend(q, k, v, causal=True, projection=w, linear_qk=(q0, k0))
  np.testing.assert_allclose(
    out, jnp.einsum('hqk,khd->qhd', weights, v[0])[None], rtol=1e-4, atol=1e-5
  )
  # without linear_qk the map sees q, k themselves
  np.testing.assert_allclose(
    attend(q, k, v, causal=True, projection=w),
    attend(q, k, v, causal=True, projection=w, linear_qk=(q, k)),
  )
  # a hybrid whose ring keeps only the rotated keys refuses other inputs for its map
  rope = attention.get_attention('favor_softmax', window=window, num_features=32, chunk_size=4)
  with pytest.raises(ValueError, match='linear_nope=True'):
    rope(q, k, v, causal=True, projection=w, linear_qk=(q0, k0))


def _rotary_model(num_layers=2, **attention_options):
  cfg = make_config(kind='hedgehog', positions='rotary')
  cfg.num_layers = num_layers
  cfg.attention = ml_collections.ConfigDict(dict(cfg.attention.to_dict(), **attention_options))
  return models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1)), cfg


@pytest.mark.parametrize('linear_nope', [False, True])
def test_linear_attention_without_rope_ignores_position_shifts(linear_nope):
  model, cfg = _rotary_model(linear_nope=linear_nope)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  logits = model(tokens, positions=positions)[0]
  shifted = model(tokens, positions=positions + 9)[0]
  moved = float(jnp.max(jnp.abs(logits - shifted)))
  if not linear_nope:
    assert moved > 1e-3  # the feature map of a rotated vector is not relative
  else:
    assert moved < 1e-5


@pytest.mark.parametrize('rope_clamp', [0, 4])
def test_attention_transfer_feeds_the_student_unrotated_inputs(rope_clamp):
  """The transfer loss of a one-layer linear_nope student equals the error of
  its own forward pass (the teacher's projections) against the teacher's attention:
  only if the transfer gives its map the unrotated q, k (and, with a clamp acting on
  its sinks, the queries rotated to it)."""
  student, cfg = _rotary_model(
    num_layers=1, window=2, sinks=1, linear_nope=True, rope_clamp=rope_clamp
  )
  teacher_cfg = ml_collections.ConfigDict(cfg.to_dict())
  teacher_cfg.attention = ml_collections.ConfigDict(dict(kind='softmax'))
  teacher = models.build_model(teacher_cfg, rngs=nnx.Rngs(params=0, dropout=1))
  shared = nnx.All(nnx.Param, nnx.Not(FeatureParam))  # not the maps' own
  nnx.update(teacher, nnx.state(student, shared))  # the same projections
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 12)), jnp.int32)
  _, taught = models.capture_intermediates(teacher, tokens)
  _, own = models.capture_intermediates(student, tokens)
  sums = attention_transfer.transfer_sums(student, taught, None, None)
  expected = sum(
    jnp.sum(
      jnp.mean(
        jnp.square(own[f'layers.{i}.attn.attended'] - taught[f'layers.{i}.attn.attended']),
        axis=(-2, -1),
      )
    )
    for i in range(cfg.num_layers)
  )
  np.testing.assert_allclose(float(sums['loss_sum']), float(expected), rtol=1e-4)
  rotated = dict(taught)
  del rotated['layers.0.attn.qk_unrotated']  # never silently the rotated pair
  with pytest.raises(ValueError, match='sowed no unrotated q, k'):
    attention_transfer.transfer_sums(student, rotated, None, None)


def test_linear_nope_must_be_a_bool_and_needs_rotary_positions():
  with pytest.raises(ValueError, match='linear_nope must be True or False'):
    attention.get_attention('hedgehog', linear_nope='yes')
  cfg = make_config(kind='hedgehog', positions='learned')
  cfg.attention.linear_nope = True
  with pytest.raises(ValueError, match="attention.linear_nope: .* positions are 'learned'"):
    models.build_model(cfg, rngs=nnx.Rngs(params=0))
