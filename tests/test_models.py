"""Tests for performer.models: tiny dims (2 layers, emb 32, 2 heads, L <= 32).

Models are cached per configuration and run through one nnx.jit wrapper, so
each configuration is built and compiled once for the whole file.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import kind_params
from performer import attention, models
from performer.models import positions as positions_lib

VOCAB = 13
L = 16
CAUSAL_TASKS = ('causal_lm', 'image_ar')
TASKS = models.FAMILIES['transformer'].tasks
FEATURE_KINDS = tuple(k for k in attention.KINDS if attention.get_attention(k).uses_projection)


def make_config(task='causal_lm', kind='softmax', **overrides):
  image = task == 'image_ar'
  cfg = dict(
    task=task,
    vocab_size=256 if image else VOCAB,
    num_layers=2,
    num_heads=2,
    emb_dim=32,
    mlp_dim=64,
    dropout_rate=0.0,
    max_len=32,
    positions='learned',
    dtype='float32',
    image_shape=(4, 4, 2) if image else None,
    attention=dict(
      kind=kind,
      num_features=16,
      chunk_size=4,
      orthogonal=True,
      feature_norms='chi',
      per_head_features=False,
    ),
  )
  attn = overrides.pop('attention', {})
  cfg.update(overrides)
  cfg['attention'].update(attn)
  return ml_collections.ConfigDict(cfg)


@functools.lru_cache(maxsize=None)
def cached_model(task='causal_lm', kind='softmax', positions='learned', dtype='float32'):
  cfg = make_config(task, kind, positions=positions, dtype=dtype)
  return models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))


@nnx.jit
def forward(model, tokens, mask=None, segment_ids=None, positions=None):
  logits, cache = model(tokens, mask=mask, segment_ids=segment_ids, positions=positions)
  assert cache is None
  return logits


def random_tokens(seed, shape, vocab):
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize('kind', kind_params(attention.KINDS))
@pytest.mark.parametrize('task', TASKS)
def test_logits_shape_every_task_and_kind(task, kind):
  model = cached_model(task, kind)
  tokens = random_tokens(0, (2, L), model.vocab_size)
  logits = forward(model, tokens)
  assert logits.shape == (2, L, model.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize('task', TASKS)
def test_captured_hidden_states_feed_the_logits(task):
  """The sown 'hidden' is the final normalized residual; the head maps it to the logits.
  Capturing works under jit and leaves nothing on the model."""
  model = cached_model(task, 'favor_softmax')
  tokens = random_tokens(4, (2, L), model.vocab_size)
  (logits, _), sown = nnx.jit(models.capture_intermediates)(model, tokens)
  hidden = sown['hidden']
  assert hidden.shape == (2, L, 32)
  assert not nnx.state(model, nnx.Intermediate)
  np.testing.assert_allclose(np.asarray(hidden).mean(-1), 0.0, atol=1e-5)  # LayerNorm
  np.testing.assert_allclose(logits, forward(model, tokens), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
    model.head(hidden)[..., : model.vocab_size], logits, atol=1e-5, rtol=1e-5
  )


@pytest.mark.parametrize('kind', kind_params(attention.KINDS))
@pytest.mark.parametrize('task', CAUSAL_TASKS)
def test_causal_at_model_level(task, kind):
  """Changing token t+1 (causal_lm) or t (image_ar, whose input at t is
  token t-1) leaves every logit at positions <= t unchanged."""
  model = cached_model(task, kind)
  t = 9
  changed = t + 1 if task == 'causal_lm' else t
  tokens = random_tokens(1, (1, L), model.vocab_size)
  other = tokens.at[0, changed].set((tokens[0, changed] + 1) % model.vocab_size)
  logits = forward(model, jnp.concatenate([tokens, other]))
  np.testing.assert_allclose(logits[0, : t + 1], logits[1, : t + 1], atol=1e-6, rtol=0)
  if kind != 'identity':  # identity attention has no cross-position flow
    assert not np.allclose(logits[0, t + 2 :], logits[1, t + 2 :])


def test_image_ar_first_logits_ignore_all_pixels():
  """Position 0 sees only the START token: every image gives the same logits."""
  model = cached_model('image_ar', 'favor_softmax')
  a = random_tokens(2, (1, L), 256)
  b = random_tokens(3, (1, L), 256)
  logits = forward(model, jnp.concatenate([a, b]))
  np.testing.assert_allclose(logits[0, 0], logits[1, 0], atol=1e-6)
  np.testing.assert_array_equal(
    models.shift_right(a, 256)[0], np.concatenate([[256], np.asarray(a[0, :-1])])
  )


@pytest.mark.parametrize('kind', kind_params(attention.KINDS))
def test_mlm_padding_does_not_change_real_positions(kind):
  model = cached_model('mlm', kind)
  real = 11
  tokens = random_tokens(4, (1, L), VOCAB)
  other = tokens.at[0, real:].set((tokens[0, real:] + 3) % VOCAB)
  mask = jnp.broadcast_to(jnp.arange(L) < real, (2, L))
  logits = forward(model, jnp.concatenate([tokens, other]), mask=mask)
  np.testing.assert_allclose(logits[0, :real], logits[1, :real], atol=1e-5)


def test_mlm_is_bidirectional():
  model = cached_model('mlm', 'favor_softmax')
  tokens = random_tokens(5, (1, L), VOCAB)
  other = tokens.at[0, L - 1].set((tokens[0, L - 1] + 1) % VOCAB)
  logits = forward(model, jnp.concatenate([tokens, other]))
  assert not np.allclose(logits[0, 0], logits[1, 0])


@pytest.mark.parametrize('kind', kind_params(attention.KINDS))
def test_random_features_are_variables_not_params(kind):
  model = cached_model('causal_lm', kind)
  feats = jax.tree.leaves(nnx.state(model, attention.RandomProjection))
  params = nnx.state(model, nnx.Param)
  param_leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert not any(isinstance(p, attention.RandomProjection) for p in param_leaves)
  assert 'projection' not in str(jax.tree_util.tree_structure(params))
  if kind in FEATURE_KINDS:
    assert len(feats) == 2 and feats[0].shape == (16, 16)  # one per layer
  else:
    assert feats == []


def test_per_head_features_and_redraw():
  cfg = make_config(
    'causal_lm', 'favor_softmax', attention=dict(per_head_features=True, orthogonal=False)
  )
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  graphdef, feats, rest = nnx.split(model, attention.RandomProjection, ...)
  assert all(x.shape == (2, 16, 16) for x in jax.tree.leaves(feats))
  fresh = attention.redraw_projections(feats, jax.random.key(7))
  model2 = nnx.merge(graphdef, fresh, rest)
  tokens = random_tokens(6, (1, L), VOCAB)
  assert not np.allclose(forward(model, tokens), forward(model2, tokens))


def test_rope_relative_shift_property():
  """q·k after RoPE depends only on the position difference."""
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(1, 1, 1, 8), jnp.float32)
  k = jnp.asarray(rng.randn(1, 1, 1, 8), jnp.float32)

  def score(pq, pk):
    rq = positions_lib.apply_rope(q, jnp.array([[pq]]))
    rk = positions_lib.apply_rope(k, jnp.array([[pk]]))
    return float(jnp.sum(rq * rk))

  assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
  assert score(0, 7) == pytest.approx(score(20, 27), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
  # Position 0 is the identity rotation; norms are preserved.
  np.testing.assert_allclose(positions_lib.apply_rope(q, jnp.array([[0]])), q)
  np.testing.assert_allclose(
    jnp.linalg.norm(positions_lib.apply_rope(q, jnp.array([[37]]))), jnp.linalg.norm(q), rtol=1e-5
  )


def test_rotary_model_is_shift_invariant():
  """With only rotary positions and exact softmax, adding a constant to all
  positions leaves the logits unchanged; with learned positions it does not."""
  tokens = random_tokens(7, (1, L), VOCAB)
  pos = positions_lib.default_positions(1, L)
  rot = cached_model('causal_lm', 'softmax', positions='rotary')
  np.testing.assert_allclose(
    forward(rot, tokens, positions=pos), forward(rot, tokens, positions=pos + 9), atol=1e-4
  )
  learned = cached_model('causal_lm', 'softmax')
  assert not np.allclose(
    forward(learned, tokens, positions=pos), forward(learned, tokens, positions=pos + 9), atol=1e-4
  )


def test_axial_positions_cover_64x64x3():
  axial = positions_lib.AxialPositions((64, 64, 3), 4, rngs=nnx.Rngs(0))
  assert axial.max_len == 12288
  p = jnp.arange(12288)
  row, col, ch = axial.coordinates(p)
  np.testing.assert_array_equal(row * 64 * 3 + col * 3 + ch, p)  # raster order
  assert (int(row.max()), int(col.max()), int(ch.max())) == (63, 63, 2)
  emb = axial(p[None])
  assert emb.shape == (1, 12288, 4)
  np.testing.assert_allclose(
    emb[0, 3 * 64 * 3 + 5 * 3 + 1],
    axial.row.embedding[3] + axial.col.embedding[5] + axial.channel.embedding[1],
    rtol=1e-6,
  )
  # Full-size image model builds; a short prefix runs (L <= max_len).
  cfg = make_config(
    'image_ar', 'favor_softmax', positions='axial', image_shape=(64, 64, 3), max_len=12288
  )
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  assert forward(model, random_tokens(8, (1, 8), 256)).shape == (1, 8, 256)


@pytest.mark.parametrize('positions', ['sinusoidal', 'axial', 'none'])
def test_other_positions_run(positions):
  task = 'image_ar' if positions == 'axial' else 'causal_lm'
  model = cached_model(task, 'favor_relu', positions=positions)
  tokens = random_tokens(9, (1, L), model.vocab_size)
  assert forward(model, tokens).shape == (1, L, model.vocab_size)


def test_bfloat16_compute_gives_float32_logits():
  model = cached_model('causal_lm', 'favor_softmax', dtype='bfloat16')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits = forward(model, random_tokens(10, (2, L), VOCAB))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  ref = forward(cached_model('causal_lm', 'favor_softmax'), random_tokens(10, (2, L), VOCAB))
  np.testing.assert_allclose(logits, ref, atol=0.15)  # same params, bf16 noise


@pytest.mark.parametrize('positions', ['learned', 'rotary'])
@pytest.mark.parametrize('kind', ['softmax', 'favor_softmax'])
def test_packed_segments_match_separate_runs(kind, positions):
  model = cached_model('causal_lm', kind, positions=positions)
  a = random_tokens(11, (1, 10), VOCAB)
  b = random_tokens(12, (1, 6), VOCAB)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 10 + [2] * 6], jnp.int32)
  pos = jnp.asarray([list(range(10)) + list(range(6))], jnp.int32)
  np.testing.assert_array_equal(models.positions_from_segments(seg), pos)
  got = forward(model, packed, segment_ids=seg, positions=pos)
  np.testing.assert_allclose(got[:, :10], forward(model, a), atol=1e-5)
  np.testing.assert_allclose(got[:, 10:], forward(model, b), atol=1e-5)
  # Positions default to restarting per segment when segment_ids are given.
  np.testing.assert_allclose(forward(model, packed, segment_ids=seg), got, atol=1e-6)


def test_packed_images_restart_with_start_token():
  model = cached_model('image_ar', 'favor_softmax')
  a, b = random_tokens(13, (1, 8), 256), random_tokens(14, (1, 8), 256)
  seg = jnp.asarray([[1] * 8 + [2] * 8], jnp.int32)
  got = forward(model, jnp.concatenate([a, b], axis=1), segment_ids=seg)
  np.testing.assert_allclose(got[:, 8:], forward(model, b), atol=1e-5)


def test_bad_inputs_raise_clear_errors():
  model = cached_model('causal_lm', 'softmax')
  with pytest.raises(ValueError, match=r'token id 13 at position \(0, 3\)'):
    model(jnp.asarray([[1, 2, 3, 13]], jnp.int32))
  with pytest.raises(ValueError, match=r'token id -1 at position \(1, 0\)'):
    models.check_tokens(np.array([[0, 1], [-1, 2]]), VOCAB)
  models.check_tokens(np.array([[0, 12]]), VOCAB)
  with pytest.raises(ValueError, match='length 33 exceeds the model max_len 32'):
    model(jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match=r'int array \[batch, length\]'):
    model(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match=r'int array \[batch, length\]'):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match='valid: .*causal_lm.*mlm.*image_ar'):
    models.build_model(make_config(task='seq2seq'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='axial'):
    models.build_model(make_config(positions='axial'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='unknown attention kind'):
    models.build_model(make_config(kind='nope'), rngs=nnx.Rngs(0))


def test_param_count_and_tied_embeddings():
  model = cached_model('causal_lm', 'favor_softmax')
  d, mlp, v = 32, 64, VOCAB
  block = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 2 * 2 * d
  expected = v * d + 32 * d + 2 * block + 2 * d + (d * v + v)
  assert models.param_count(model) == expected
  tied = models.build_model(make_config(tie_embeddings=True), rngs=nnx.Rngs(0))
  assert models.param_count(tied) == expected - (d * v + v)
  tokens = random_tokens(15, (1, L), VOCAB)
  assert forward(tied, tokens).shape == (1, L, VOCAB)


def test_dropout_only_when_not_deterministic():
  cfg = make_config(dropout_rate=0.5)
  model = models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  tokens = random_tokens(16, (1, L), VOCAB)
  np.testing.assert_array_equal(model(tokens)[0], model(tokens)[0])
  train, _ = model(tokens, deterministic=False)
  assert not np.allclose(train, model(tokens)[0])
  assert not np.allclose(train, model(tokens, deterministic=False)[0])
