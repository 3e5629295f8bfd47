"""LM1B (One Billion Word benchmark) from TFDS `lm1b`, read as ArrayRecord through grain.

Prepare once (needs network, TensorFlow for the TFDS catalog builder, ~10 GB):

    python -m performer.data.prepare lm1b --data_dir ~/tensorflow_datasets

* Splits: 'train' is TFDS train minus its last 10,000 sentences, which are
  'validation'; 'test' is TFDS test (all 50 held-out shards, 306,688
  sentences; published numbers use shard 00000 only, ~6k sentences, so
  expect close but not identical per-word perplexities).
* Tokenizer: a sentencepiece model (tokenizer.py) with
  ``config.data.vocab_size`` pieces (default 30,000, as in Flax's lm1b
  example) trained on the first 10M characters of the training split (TFDS
  stores examples shuffled, so that is a random sample) and cached next to
  the data as ``<data_dir>/lm1b/spm_unigram_<vocab_size>.model``
  (``config.data.spm_path`` overrides). `prepare` trains it; otherwise the
  first run does.
* Examples are ``[BOS] + ids + [EOS]``; with ``config.data.pack=True`` they are
  packed into rows of seq_len with segment_ids, so sentences in one row never
  attend to each other (and positions restart per sentence in the model).
* Per-word perplexity: :func:`eval_word_counts` gives the tokens eval scores
  and the words they stand for (whitespace words + 1 for the end of
  sentence, the benchmark's convention); word perplexity =
  exp(token_loss / words_per_token).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator

from performer.data import catalog, sequences, tokenizer
from performer.data import text as text_lib

DATASET = 'lm1b'
TFDS_NAME = 'lm1b'
DEFAULT_VOCAB_SIZE = 30_000


def _require(cfg) -> str:
  data_dir = catalog.data_dir_for(cfg)
  catalog.require_prepared(DATASET, TFDS_NAME, data_dir, catalog.SPECS[DATASET].splits)
  return data_dir


def _text(record) -> str:
  value = record['text']
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def spm_path_for(cfg) -> str:
  explicit = getattr(cfg, 'spm_path', '') or ''
  if explicit:
    return os.path.abspath(os.path.expanduser(explicit))
  size = text_lib.vocab_size_for(cfg, DEFAULT_VOCAB_SIZE)
  return os.path.join(catalog.data_dir_for(cfg), TFDS_NAME, f'spm_unigram_{size}.model')


def vocab_for(cfg) -> tokenizer.SentencePieceVocab:
  """The cached sentencepiece vocabulary; trained from the training split if missing."""
  data_dir = _require(cfg)  # also when the model exists: a run without data stops here
  path = spm_path_for(cfg)
  if os.path.exists(path):
    return tokenizer.load_or_train(path, None, 0)

  def texts():
    source = catalog.open_source(TFDS_NAME, 'train', data_dir)
    return catalog.first_records(source, text_lib.SPM_MAX_CHARS, _text)

  return tokenizer.load_or_train(path, texts, text_lib.vocab_size_for(cfg, DEFAULT_VOCAB_SIZE))


def _encode(record, vocab) -> Any:
  return vocab.encode_example(_text(record))


def _source(cfg, split: str, data_dir: str):
  return catalog.split_source(TFDS_NAME, split, data_dir, has_validation=False)


def build_dataset(
  cfg,
  *,
  split: str,
  batch_size: int,
  seed: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
) -> Iterator[dict[str, Any]]:
  """Batches of {'tokens','mask','segment_ids'} (see sequences.py for crop/pack/eval)."""
  data_dir = _require(cfg)  # first: fails in well under a second when not prepared
  vocab = vocab_for(cfg)
  return sequences.build(
    _source(cfg, split, data_dir),
    functools.partial(_encode, vocab=vocab),
    cfg,
    split=split,
    batch_size=batch_size,
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
    num_epochs=num_epochs,
    name=DATASET,
  )


def eval_word_counts(cfg, split: str = 'test') -> dict[str, Any]:
  """{'num_tokens', 'num_words', 'words_per_token', 'num_examples', 'seq_len'} of `split`.

  Computed once (tokenizing the split, ~10 s for test) and cached as JSON next
  to the sentencepiece model.
  """
  seq_len, _, _ = sequences.check_options(cfg)
  data_dir = _require(cfg)
  vocab = vocab_for(cfg)
  source = _source(cfg, split, data_dir)
  key = {
    'dataset': DATASET,
    'version': os.path.basename(
      catalog.find_prepared(TFDS_NAME, data_dir, catalog.SPECS[DATASET].splits) or ''
    ),
    'num_examples': len(source),
    'spm': os.path.basename(vocab.path),
    'split': split,
    'seq_len': seq_len,
  }
  texts = (_text(source[i]) for i in range(len(source)))
  return text_lib.cached_word_counts(
    f'{vocab.path}.{split}.L{seq_len}.words.json',
    key,
    lambda: text_lib.word_counts(texts, vocab, seq_len),
  )


def prepare(
  data_dir: str, *, vocab_size: int = DEFAULT_VOCAB_SIZE, spm_path: str = '', manual_dir: str = ''
) -> dict[str, Any]:
  """Downloads and prepares TFDS lm1b as ArrayRecord, then trains the tokenizer."""
  catalog.prepare_catalog(TFDS_NAME, data_dir, manual_dir=manual_dir)
  cfg = _Cfg(data_dir=data_dir, vocab_size=vocab_size, spm_path=spm_path)
  vocab = vocab_for(cfg)
  return {
    'path': catalog.find_prepared(TFDS_NAME, data_dir, catalog.SPECS[DATASET].splits),
    'spm_path': vocab.path,
    'vocab_size': vocab.size,
  }


class _Cfg:
  """A minimal stand-in for config.data (prepare runs without a config file)."""

  def __init__(self, **kwargs):
    self.__dict__.update(kwargs)
