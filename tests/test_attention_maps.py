"""performer.models.attention_maps: attention matrices rebuilt from captured q and k."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from performer import models
from performer.models import attention_maps

L = 24


def build(kind, task):
  cfg = ml_collections.ConfigDict(
    dict(
      task=task,
      vocab_size=29,
      num_layers=2,
      num_heads=2,
      emb_dim=16,
      mlp_dim=32,
      max_len=L,
      attention=dict(kind=kind, num_features=64, chunk_size=8),
    )
  )
  return models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))


@pytest.mark.parametrize('kind', ['softmax', 'favor_softmax', 'favor_relu', 'identity'])
@pytest.mark.parametrize('task', ['causal_lm', 'mlm'])
def test_matrix_times_v_is_the_attention_output(kind, task):
  model = build(kind, task)
  tokens = jnp.asarray(np.random.RandomState(0).randint(4, 24, (2, L)), jnp.int32)
  mask = jnp.arange(L)[None] < jnp.array([[L], [15]])
  expected, _ = model(tokens, mask=mask)
  logits, maps = attention_maps.attention_maps(model, tokens, mask=mask)
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
  assert maps.shape == (2, 2, 2, L, L)
  # Capturing stores nothing on the model.
  assert not nnx.state(model, nnx.Intermediate)
  _, records = attention_maps.capture_attention_inputs(model, tokens, mask=mask)
  layer = model.layers[0]
  positions = jnp.broadcast_to(jnp.arange(L), (2, L))
  x = layer.attn_norm(model.embed(tokens) + model.pos_embed(positions))
  v = layer.attn.value(x)
  r = records[0]
  np.testing.assert_allclose(r['v'], v, rtol=1e-6, atol=1e-6)
  out = layer.attn.attend(r['q'], r['k'], v, causal=r['causal'], mask=mask)
  rebuilt = jnp.einsum('bhqk,bkhd->bqhd', maps[0], v)
  np.testing.assert_allclose(rebuilt, out, rtol=1e-3, atol=2e-4)
  rows = np.asarray(maps.sum(-1))  # [layers, B, H, L]
  np.testing.assert_allclose(rows[..., :15], 1.0, rtol=1e-4)  # real in both rows
  assert np.all(rows[:, 1, :, 15:] == 0)  # padded queries of row 1
  if task == 'causal_lm':
    assert np.all(np.triu(np.asarray(maps), k=1) == 0)


def test_unknown_kind_is_rejected():
  q = jnp.ones((1, 4, 1, 8))
  with pytest.raises(ValueError, match='unknown attention kind'):
    attention_maps.attention_matrix('favor_nope', q, q, causal=False)


def test_needs_a_transformer():
  with pytest.raises(ValueError, match='layers'):
    attention_maps.capture_attention_inputs(object(), jnp.zeros((1, 4), jnp.int32))
