"""LoRA on q, k, v, o (performer/models/lora.py): a no-op at init, typed parameters
importers expect missing, and a merge back into plain kernels."""

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_convert_llama import TINY, tiny_hf_tensors, write_gguf, write_hf

from conftest import ROOT
from performer import models
from performer.convert import pretrained
from performer.training import config_utils, optim

# The sizes of test_convert_llama's TINY throughout: eager init ops compile once per shape.
SIZES = dict(vocab_size=64, num_layers=2, num_heads=4, emb_dim=32, mlp_dim=48, max_len=64)
LLAMA = dict(
  SIZES, family='llama', num_kv_heads=2,
  attention=dict(kind='favor_softmax', num_features=16, chunk_size=12),
)  # fmt: skip
TRANSFORMER = dict(SIZES, family='transformer', attention=dict(kind='softmax'))
TOKENS = jnp.asarray([[3, 17, 42, 5, 9, 33, 0, 11, 27, 8, 30, 1]], jnp.int32)
PROJECTIONS = ('query', 'key', 'value', 'out')


@functools.cache
def _built(cfg):
  return models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))


def build(fields, **overrides):
  """A fresh copy of the model (eager builds are the slow part here)."""
  return nnx.clone(_built(models.model_config(dict(fields, **overrides))))


def flat_state(model):
  """{dotted path: numpy value} of everything the model holds (RNG keys as key data)."""

  def numpy(x):
    x = x[...]
    return np.asarray(
      jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    )

  return {'.'.join(map(str, k)): numpy(v) for k, v in nnx.to_flat_state(nnx.state(model))}


_forward = nnx.jit(lambda model, tokens: model(tokens)[0])


def logits(model):
  return np.asarray(_forward(model, TOKENS))


@pytest.mark.parametrize('fields', [LLAMA, TRANSFORMER], ids=['llama_gqa', 'transformer'])
def test_lora_at_init_is_the_base_model(fields):
  """B = 0 and A's key drawn beside the params stream: every other initial value
  (kernels, random features) and the logits are bitwise those of the base model.
  (One config per family throughout, so the jitted forwards are compiled once.)"""
  plain, lora = build(fields), build(fields, lora_rank=4)
  base_state, lora_state = flat_state(plain), flat_state(lora)
  assert set(lora_state) - set(base_state) == set(models.new_params(lora))
  for path, value in base_state.items():
    np.testing.assert_array_equal(lora_state[path], value, path)
  np.testing.assert_array_equal(logits(lora), logits(plain))


def test_lora_params_are_the_four_projections():
  model = build(LLAMA, lora_rank=4)
  expected = sorted(
    f'layers.{i}.attn.{p}.lora_{ab}' for i in range(2) for p in PROJECTIONS for ab in 'ab'
  )
  assert models.new_params(model) == expected
  assert models.feature_map_params(model) == []
  selected = nnx.state(model, models.LoraParam)  # what a LoRA fine-tune trains
  assert sorted('.'.join(map(str, k)) for k, _ in nnx.to_flat_state(selected)) == expected
  attn = model.layers[0].attn
  shapes = {p: (getattr(attn, p).lora_a.shape, getattr(attn, p).lora_b.shape) for p in PROJECTIONS}
  assert shapes == {
    'query': ((32, 4), (4, 4, 8)),
    'key': ((32, 4), (4, 2, 8)),
    'value': ((32, 4), (4, 2, 8)),
    'out': ((4, 8, 4), (4, 32)),
  }
  assert not np.asarray(attn.query.lora_b[...]).any() and np.asarray(attn.query.lora_a[...]).std()


def test_a_lora_step_moves_only_lora_params():
  """The train step's freezing (training/optim.py): the base model stays frozen."""
  graphdef, params, *rest = models.split(build(TRANSFORMER, num_layers=1, lora_rank=4))
  flags = optim.trainable_flags(params, 'lora')
  tx = optax.adam(0.1)

  @jax.jit
  def step(params, opt_state):
    loss = lambda p: nnx.merge(graphdef, optim.freeze(p, flags), *rest)(TOKENS)[0].sum()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optim.keep_frozen(optax.apply_updates(params, updates), params, flags), opt_state

  new, _ = step(params, tx.init(params))
  moved = [
    '.'.join(map(str, k))
    for (k, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(new))
    if not np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
  ]
  # Only B moves on the first step: A's gradient is x^T (dL/dh) B^T, zero while B is.
  assert moved == sorted(f'layers.0.attn.{p}.lora_b' for p in PROJECTIONS)


@pytest.mark.parametrize('fields', [LLAMA, TRANSFORMER], ids=['llama_gqa', 'transformer'])
def test_merge_lora_matches_the_lora_model(fields):
  model = build(fields, lora_rank=4)
  rng = np.random.default_rng(0)
  for _, var in nnx.to_flat_state(nnx.state(model, models.LoraParam)):
    var[...] = jnp.asarray(0.2 * rng.standard_normal(var.shape), jnp.float32)
  merged = models.merge_lora(model)
  assert merged.config.lora_rank == 0 and model.config.lora_rank == 4
  assert models.new_params(merged) == []
  # Exactly the state of a model built without LoRA, so it exports and decodes as one.
  fresh = flat_state(build(fields))
  got = flat_state(merged)
  assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in fresh.items()}
  want = logits(model)
  assert not np.allclose(want, logits(build(fields)), atol=1e-3)  # the update does something
  np.testing.assert_allclose(logits(merged), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fmt', ['gguf', 'hf'])
def test_pretrained_import_reports_lora_as_expected_missing(tmp_path, fmt, caplog):
  """The train.py init_from path (convert.pretrained): the key map ignores LoRA
  factors, they keep B = 0, so the import computes what the plain import does."""
  tensors = tiny_hf_tensors()
  if fmt == 'gguf':
    source = 'gguf:' + write_gguf(tmp_path / 'tiny.gguf', tensors)
  else:
    source = 'hf:' + write_hf(tmp_path / 'hf', tensors)
  pre = pretrained.open_pretrained(source)
  fields = dict(pre.fields, family=pre.family, attention=dict(kind='softmax'))
  plain, lora = build(fields), build(fields, lora_rank=4)
  assert pretrained.load_pretrained(pre, plain) == []
  with caplog.at_level(logging.INFO, logger='performer.convert.keymap'):
    missing = pretrained.load_pretrained(pre, lora)
  assert missing == models.new_params(lora) and len(missing) == TINY.num_layers * 4 * 2
  assert '16 LoRA parameters are not in the checkpoint' in caplog.text
  np.testing.assert_array_equal(logits(lora), logits(plain))


def test_config_keys():
  cfg = models.model_config(dict(LLAMA, lora_rank=2, lora_alpha=4.0))
  assert (cfg.lora_rank, cfg.lora_alpha) == (2, 4.0)
  assert models.model_config(LLAMA).lora_rank == 0
  with pytest.raises(ValueError, match='lora_rank'):
    models.model_config(dict(LLAMA, lora_rank=-1))
  with pytest.raises(ValueError, match='lora_alpha'):
    models.model_config(dict(LLAMA, lora_rank=2, lora_alpha=0.0))
  # configs/base.py carries both keys, so a run switches LoRA on from the command line.
  config = config_utils.load_config(
    os.path.join(ROOT, 'configs', 'tiny.py'), ['model.lora_rank=4', 'model.lora_alpha=8.0']
  )
  cfg = models.model_config(dict(config_utils.validate(config).model.to_dict(), vocab_size=64))
  assert (cfg.lora_rank, cfg.lora_alpha) == (4, 8.0)
