"""Tests for the short causal convolution on q, k, v (`model.short_conv`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from performer import models
from performer.models.short_conv import ShortConv


def conv(size=4, heads=2, dim=3):
  return ShortConv(size, heads, dim, rngs=nnx.Rngs(0))


def inputs(length=10, batch=2, heads=2, dim=3, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, heads, dim))


def test_causal_and_matches_a_direct_convolution():
  c, x = conv(), inputs()
  w = np.asarray(c.kernel[...])
  xs = np.asarray(x)
  expected = np.zeros_like(xs)
  for t in range(xs.shape[1]):
    for i in range(c.size):
      if t - i >= 0:
        expected[:, t] += w[i] * xs[:, t - i]
  expected = np.asarray(jax.nn.silu(expected))
  np.testing.assert_allclose(np.asarray(c(x)), expected, rtol=1e-5, atol=1e-6)
  later = x.at[:, 6:].set(100.0)  # the future never reaches the past
  np.testing.assert_array_equal(np.asarray(c(later))[:, :6], np.asarray(c(x))[:, :6])


def test_packed_segments_do_not_mix():
  c, x = conv(), inputs(length=10, batch=1)
  seg = jnp.asarray([[1] * 4 + [2] * 6])
  packed = c(x, segment_ids=seg)
  np.testing.assert_allclose(packed[:, :4], c(x[:, :4]), rtol=1e-6)
  np.testing.assert_allclose(packed[:, 4:], c(x[:, 4:]), rtol=1e-6)


def test_prefill_and_steps_equal_forward_with_right_padding():
  c, x = conv(), inputs(length=9)
  lengths = jnp.asarray([9, 5])
  mask = jnp.arange(9)[None] < lengths[:, None]
  history = c.init_history(2)
  out, history = c.prefill(history, x[:, :7], mask=mask[:, :7])
  np.testing.assert_allclose(out[0], c(x[:1, :7])[0], rtol=1e-6)
  np.testing.assert_allclose(out[1, :5], c(x[1:, :5])[0], rtol=1e-6)
  # the next token of each row continues from its own last real token
  nxt = inputs(length=1, seed=5)[:, 0]
  y, _ = c.step(history, nxt)
  whole0 = jnp.concatenate([x[:1, :7], nxt[:1, None]], 1)
  whole1 = jnp.concatenate([x[1:, :5], nxt[1:, None]], 1)
  np.testing.assert_allclose(y[0], c(whole0)[0, -1], rtol=1e-5)
  np.testing.assert_allclose(y[1], c(whole1)[0, -1], rtol=1e-5)
  _, kept = c.step(history, nxt, mask=jnp.asarray([True, False]))
  np.testing.assert_array_equal(kept[1], history[1])


@pytest.mark.parametrize('kind,options', [('softmax', {}), ('hedgehog', {'window': 4})])
def test_model_decode_equals_forward(kind, options):
  cfg = dict(
    vocab_size=50, num_layers=2, num_heads=2, num_kv_heads=1, emb_dim=16, mlp_dim=32,
    max_len=32, positions='rotary', short_conv=4, attention=dict(kind=kind, **options),
  )  # fmt: skip
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  assert any('convs' in p for p in models.new_params(model))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)
  full, _ = model(tokens)
  out, cache = model(tokens[:, :5], cache=model.init_cache(2, 32))
  outs = [out]
  for t in range(5, 12):
    out, cache = model(tokens[:, t : t + 1], cache=cache)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-4)


def test_bad_width_is_a_config_error():
  cfg = dict(vocab_size=5, num_layers=1, num_heads=1, emb_dim=4, mlp_dim=4, max_len=8)
  with pytest.raises(ValueError, match='short_conv'):
    models.model_config({**cfg, 'short_conv': -1})
