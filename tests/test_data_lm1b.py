"""LM1B and local text pipelines: sentencepiece, packing, word counts, a tiny training run.

Offline: LM1B is served by `tfds.testing.mock_data` (USE_CODE policy: the lm1b builder's
code defines the features, the mock generates random text), with the "is it prepared?"
file check stubbed out. Text fixtures are synthetic sentences written into tmp_path.
"""

import random

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from performer import data
from performer.data import catalog, lm1b, sequences, tokenizer

WORDS = (
  'the a cat dog sat on mat runs quickly slowly red blue green house tree river over '
  'under and but with zebra ocean piano quiet loud'
).split()


def sentences(n, seed=0):
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + ' .' for _ in range(n)]


def data_cfg(**kw):
  cfg = ml_collections.ConfigDict(
    dict(
      name='lm1b',
      path='',
      seq_len=32,
      crop='random',
      pack=True,
      data_dir='',
      vocab_size=300,
      spm_path='',
    )
  )
  cfg.update(kw)
  return cfg


@pytest.fixture
def mock_lm1b(monkeypatch, tmp_path):
  """Mock LM1B with 40 train and 40 test sentences; data_dir = tmp_path."""
  monkeypatch.setattr(catalog, 'find_prepared', lambda *a, **k: str(tmp_path / 'lm1b/1.1.0'))
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    yield data_cfg(data_dir=str(tmp_path))


def test_sentencepiece_trains_and_round_trips(tmp_path):
  path = tokenizer.train(sentences(60), str(tmp_path / 'spm.model'), vocab_size=300)
  vocab = tokenizer.SentencePieceVocab(path)
  assert 256 < vocab.size <= 300  # byte fallback pieces + learned pieces, soft limit
  assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.mask_id) == (0, 1, 2, 4)
  for s in sentences(5, seed=1) + ['unseen wörds ✓ and  double  spaces', '<mask> stays text']:
    ids = vocab.encode(s)
    assert vocab.decode(ids) == s
    assert vocab.mask_id not in ids
  example = vocab.encode_example('the cat sat')
  assert example.dtype == np.int32 and example[0] == 1 and example[-1] == 2
  assert vocab.decode(example) == 'the cat sat'  # specials dropped
  with pytest.raises(ValueError, match='outside the vocabulary'):
    vocab.decode([vocab.size])


def test_lm1b_packed_batches_and_tokenizer_cache(mock_lm1b, tmp_path):
  it = data.build_dataset(mock_lm1b, split='train', batch_size=4, seed=0)
  batch = next(it)
  assert set(batch) == {'tokens', 'mask', 'segment_ids'}
  assert batch['tokens'].shape == (4, 32) and batch['tokens'].dtype == np.int32
  assert batch['mask'].dtype == bool and batch['segment_ids'].dtype == np.int32
  np.testing.assert_array_equal(batch['mask'], batch['segment_ids'] > 0)
  assert batch['segment_ids'].max() > 1  # several sentences share a row
  # Segments are contiguous runs numbered 1, 2, ...; each starts with BOS.
  for tokens, seg in zip(batch['tokens'], batch['segment_ids']):
    ids = seg[seg > 0]
    assert np.all(np.diff(ids) >= 0) and ids[0] == 1
    for s in np.unique(ids):
      assert tokens[seg == s][0] == tokenizer.BOS_ID
  vocab = data.vocab_for(mock_lm1b)
  assert vocab.path == str(tmp_path / 'lm1b' / 'spm_unigram_300.model')
  assert batch['tokens'].max() < vocab.size


def test_lm1b_packing_round_trips_the_split(mock_lm1b):
  """Unpacking the packed eval rows gives back every sentence's tokens exactly once
  (first-fit packing may change their order)."""
  vocab = data.vocab_for(mock_lm1b)
  source = catalog.split_source(lm1b.SPEC, 'test', mock_lm1b.data_dir)
  expected = [vocab.encode_example(lm1b._text(source[i]))[:32] for i in range(len(source))]
  got = []
  for batch in data.build_dataset(mock_lm1b, split='test', batch_size=4):
    got += sequences.unpack(batch)
  assert len(got) == len(expected) == 40
  assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
  # Two shards: the same number of batches each, and together every sentence once.
  shards = [
    list(data.build_dataset(mock_lm1b, split='test', batch_size=2, shard_index=i, shard_count=2))
    for i in range(2)
  ]
  assert len(shards[0]) == len(shards[1])
  assert sum(len(sequences.unpack(b)) for s in shards for b in s) == 40


def test_lm1b_splits_and_unpacked_eval_padding(mock_lm1b):
  cfg = data_cfg(**{**mock_lm1b.to_dict(), 'pack': False})
  # 40 mock train sentences: the last 4 (a tenth) are validation, the rest train.
  batches = list(data.build_dataset(cfg, split='validation', batch_size=3))
  assert len(batches) == 2
  rows = np.concatenate([b['mask'] for b in batches])
  assert rows.any(axis=1).sum() == 4 and not rows[4:].any()  # 2 all-masked filler rows
  train = data.build_dataset(cfg, split='train', batch_size=4, num_epochs=1)
  assert sum(1 for _ in train) == 36 // 4


def test_eval_word_counts_match_the_scored_tokens(mock_lm1b):
  counts = data.eval_word_counts(mock_lm1b, 'test')
  source = catalog.split_source(lm1b.SPEC, 'test', mock_lm1b.data_dir)
  texts = [lm1b._text(source[i]) for i in range(len(source))]
  vocab = data.vocab_for(mock_lm1b)
  fits = [len(vocab.encode_example(t)) <= 32 for t in texts]
  assert counts['num_examples'] == 40
  assert counts['num_words'] >= sum(len(t.split()) + 1 for t, f in zip(texts, fits) if f)
  # Tokens the causal loss scores: real targets in the same segment as their input.
  scored = 0
  for b in data.build_dataset(mock_lm1b, split='test', batch_size=4):
    m, s = b['mask'], b['segment_ids']
    scored += int((m[:, 1:] & m[:, :-1] & (s[:, 1:] == s[:, :-1])).sum())
  assert counts['num_tokens'] == scored
  assert counts['words_per_token'] == pytest.approx(counts['num_words'] / scored)
  assert data.word_perplexity(2.0, counts) == pytest.approx(
    np.exp(2.0 * scored / counts['num_words'])
  )
  assert data.eval_word_counts(mock_lm1b, 'test') == counts  # cached


def test_text_file_pipeline(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_text('\n'.join(sentences(120)) + '\n\n', encoding='utf-8')
  with pytest.raises(ValueError, match='vocab_size=270 is too small'):
    data.vocab_for(data_cfg(name='text', path=str(path), vocab_size=270))
  cfg = data_cfg(name='text', path=str(path), pack=False, crop='start', vocab_size=320)
  vocab = data.vocab_for(cfg)
  assert vocab.path == f'{path}.spm320.model'
  for split in ('train', 'validation', 'test'):
    batch = next(data.build_dataset(cfg, split=split, batch_size=2))
    assert batch['tokens'].shape == (2, 32) and batch['tokens'][0, 0] == vocab.bos_id
  first = next(data.build_dataset(cfg, split='validation', batch_size=1))
  line = data.dataset_for(cfg).source(cfg, 'validation')[0]
  assert vocab.decode(first['tokens'][0][first['mask'][0]]) == line
  counts = data.eval_word_counts(cfg, 'validation')
  assert counts['num_examples'] == len(data.dataset_for(cfg).source(cfg, 'validation'))
  base = data.unigram_baseline(cfg, 'validation')
  assert 0 < base['cross_entropy'] < np.log(vocab.size)


@pytest.mark.slow
def test_tiny_lm1b_training_run(mock_lm1b, tmp_path, tiny):
  from performer.training import train_lib  # pylint: disable=g-import-not-at-top

  config = tiny(
    data__name='lm1b',
    data__data_dir=str(tmp_path),
    data__pack=True,
    data__seq_len=32,
    model__max_len=32,
    train__num_steps=3,
    train__eval_every=0,
    train__checkpoint_every=0,
    train__redraw_every=0,
    train__log_every=1,
    train__batch_size=2,
  )
  if 'vocab_size' not in config.data:  # until configs/base.py has the data keys
    with config.unlocked():
      config.data.vocab_size = 300
  out = train_lib.train_and_evaluate(config, str(tmp_path / 'work'), progress=False)
  assert out['step'] == 3
  assert np.isfinite(out['final']['test']['loss'])
  counts = data.eval_word_counts(config.data, 'test')
  assert out['final']['test']['tokens'] == counts['num_tokens']
  # The final eval reports per-word perplexity beside the per-token one.
  expected = data.word_perplexity(out['final']['test']['loss'], counts)
  assert out['final']['test']['word_perplexity'] == pytest.approx(expected)
  assert out['final']['test']['word_perplexity'] > out['final']['test']['perplexity']
